"""`mambapeft methods`: every PEFT method with its settings, their types, defaults and help."""


def add_parser(sub):
    sub.add_parser("methods", help="list every PEFT method with its settings, defaults and help")


def run(args):
    from ..peft.config import METHODS
    from ..peft.presets import preset_names
    from ..peft.settings import describe
    for name, spec in METHODS.items():
        models = "+".join("language" if m == "lm" else "Vim" for m in spec.models)
        print(f"{name:<17} {spec.family:<17} {models:<13} {spec.help}")
        for field, kind, default, text in describe(spec.settings, spec.defaults):
            print(f"{'':<4}{field}={default!r} ({kind}): {text}")
    print(f"\nlanguage presets: {', '.join(preset_names('lm'))}\nVim presets: {', '.join(preset_names('vim'))}")
