"""The `mambapeft` command."""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "tiny-mamba")


def cmd_methods(args):
    from .peft.config import METHODS
    from .peft.presets import preset_names
    for name, spec in METHODS.items():
        models = "+".join("language" if m == "lm" else "Vim" for m in spec.models)
        print(f"{name:<17} {spec.family:<17} {models:<13} {spec.help}")
        settings = [f"{f.name}={spec.defaults.get(f.name, f.default)!r}" for f in fields(spec.settings)]
        print(f"{'':<17} settings: {', '.join(settings)}")
    print(f"\nlanguage presets: {', '.join(preset_names('lm'))}\nVim presets: {', '.join(preset_names('vim'))}")


def cmd_generate(args):
    import torch
    from .models import MambaForCausalLM
    from .models.checkpoint import load_tokenizer
    torch.manual_seed(args.seed)
    model = MambaForCausalLM.from_pretrained(args.model).eval()
    if args.adapter:
        from .peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for prompt, row in zip(args.prompt, out):
        text = tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{prompt}{text}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mambapeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list every PEFT method with its settings and defaults")
    g = sub.add_parser("generate", help="load a Mamba language model (and an adapter) and generate")
    g.add_argument("prompt", nargs="*", default=["12+7="], help="one or more prompts")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local directory or hub id (default: the small model shipped with mambapeft)")
    g.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    g.add_argument("--adapter", help="directory written by PeftModel.save_pretrained")
    g.add_argument("--max-new-tokens", type=int, default=8)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .io import CheckpointError
    from .peft.config import ConfigError
    try:
        {"methods": cmd_methods, "generate": cmd_generate}[args.command](args)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"mambapeft: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
