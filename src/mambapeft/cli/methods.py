"""`mambapeft methods`: every PEFT method with its settings and defaults."""
from dataclasses import fields


def add_parser(sub):
    sub.add_parser("methods", help="list every PEFT method with its settings and defaults")


def run(args):
    from ..peft.config import METHODS
    from ..peft.presets import preset_names
    for name, spec in METHODS.items():
        models = "+".join("language" if m == "lm" else "Vim" for m in spec.models)
        print(f"{name:<17} {spec.family:<17} {models:<13} {spec.help}")
        settings = [f"{f.name}={spec.defaults.get(f.name, f.default)!r}" for f in fields(spec.settings)]
        print(f"{'':<17} settings: {', '.join(settings)}")
    print(f"\nlanguage presets: {', '.join(preset_names('lm'))}\nVim presets: {', '.join(preset_names('vim'))}")
