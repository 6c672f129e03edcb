"""`mambapeft methods`: every PEFT method with its settings (type, default, help); with --model, how
many parameters each method and each language preset trains on that model's shape."""

from . import UsageError


def add_parser(sub):
    from ..models.config import LM_SHAPES
    p = sub.add_parser("methods", help="list every PEFT method with its settings, defaults and help")
    p.add_argument("--model", metavar="SHAPE", help="also count the trainable parameters of each method "
                   f"(default settings) and language preset on this shape: {', '.join(LM_SHAPES)}")


def trainable_counts(shape, methods):
    """{label: trainable parameters} for each (label, PeftConfig) on `shape`, built on the meta device."""
    import torch

    from ..models import MambaConfig, MambaForCausalLM
    from ..peft import get_peft_model
    config = MambaConfig.preset(shape)
    counts = {}
    for label, peft_config in methods:
        with torch.device("meta"):
            model = MambaForCausalLM(config, init=False)
        counts[label] = get_peft_model(model, peft_config).num_parameters()[0]
    return config, counts


def run(args):
    from ..models.config import LM_SHAPES
    from ..peft import PeftConfig
    from ..peft.config import METHODS
    from ..peft.presets import LM_SIZES, preset, preset_names
    from ..peft.settings import describe
    counts = {}
    if args.model is not None:
        if args.model not in LM_SHAPES:
            raise UsageError(f"--model {args.model!r}: expected one of {', '.join(LM_SHAPES)}")
        size = args.model.rsplit("-", 1)[1]
        lm_methods = [(n, PeftConfig({n: {}})) for n, s in METHODS.items() if "lm" in s.models]
        presets = [(f"preset {p}", preset(p, size=size)) for p in preset_names("lm") if p != "sll_lora" or size in LM_SIZES]
        config, counts = trainable_counts(args.model, lm_methods + presets)
        print(f"{args.model}: D={config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size}, "
              f"{'tied' if config.tie_word_embeddings else 'untied'} head, model_type {config.model_type}; "
              "trainable parameters at default settings\n")
    for name, spec in METHODS.items():
        models = "+".join("language" if m == "lm" else "Vim" for m in spec.models)
        count = f"{counts[name]:>14,} " if name in counts else (" " * 15 if counts else "")
        print(f"{name:<17} {count}{spec.family:<17} {models:<13} {spec.help}")
        for field, kind, default, text in describe(spec.settings, spec.defaults):
            print(f"{'':<4}{field}={default!r} ({kind}): {text}")
    print(f"\nlanguage presets: {', '.join(preset_names('lm'))}\nVim presets: {', '.join(preset_names('vim'))}")
    if counts:
        print(f"\nlanguage presets on {args.model}, trainable parameters:")
        for label, n in counts.items():
            if label.startswith("preset "):
                print(f"{label[7:]:<17} {n:>14,}")
