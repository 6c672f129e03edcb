"""`mambapeft generate`: load a Mamba language model (and an adapter) and generate."""
from . import DEFAULT_MODEL, UsageError


def add_parser(sub):
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


def check(args):
    """The arguments' mistakes, before any model is loaded."""
    if not args.prompt or any(not p for p in args.prompt):
        raise UsageError("an empty prompt: give at least one character to continue")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0: no top-k filtering), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.sample and not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 when sampling, got {args.temperature}")


def run(args):
    import torch
    from ..models import MambaForCausalLM
    from ..models.checkpoint import load_tokenizer
    check(args)
    torch.manual_seed(args.seed)
    model = MambaForCausalLM.from_pretrained(args.model).eval()
    if args.adapter:
        from ..peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
    if batch["input_ids"].shape[1] == 0:
        raise UsageError("the prompt encodes to no tokens with this tokenizer")
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for prompt, row in zip(args.prompt, out):
        text = tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{prompt}{text}")
