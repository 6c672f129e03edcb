"""`mambapeft pretrain lm|vim CORPUS_DIR OUT_DIR`: the default's base models from scratch, on the corpora
that `mambapeft build-corpora` writes (OUT/corpus), with the training engine."""
from . import UsageError


def add_parser(sub):
    from ..pretrain import images, text
    p = sub.add_parser("pretrain", help="pretrain the default's small Mamba LM or Vim from scratch on the "
                       "build-corpora corpora", description=__doc__.split("\n")[0])
    kinds = p.add_subparsers(dest="kind", required=True)
    lm = kinds.add_parser("lm", help="byte-level BPE tokenizer + Mamba-1 LM on corpus/text.jsonl(.gz)")
    vim = kinds.add_parser("vim", help="Vision Mamba classifier on corpus/images.safetensors")
    for q, d in ((lm, text.DEFAULTS), (vim, images.DEFAULTS)):
        q.add_argument("corpus_dir", help="the corpus/ folder build-corpora wrote")
        q.add_argument("out_dir", help="new or empty folder for the model, its curves and pretrain.json")
        q.add_argument("--steps", type=int, default=d["steps"], help=f"optimizer steps (default {d['steps']})")
        q.add_argument("--batch-size", type=int, default=d["batch_size"],
                       help=f"{'rows' if q is lm else 'images'} per step (default {d['batch_size']})")
        q.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default {d['lr']})")
        q.add_argument("--warmup", type=int, default=d["warmup"], help=f"warmup steps (default {d['warmup']})")
        q.add_argument("--eval-every", type=int, default=d["eval_every"],
                       help=f"validate every N steps; the best validation weights are kept (default {d['eval_every']})")
        q.add_argument("--weight-decay", type=float, default=d["weight_decay"])
        q.add_argument("--validation", type=float, default=d["validation"],
                       help=f"fraction held out for validation (default {d['validation']})")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    lm.add_argument("--seq-len", type=int, default=text.DEFAULTS["seq_len"], help="tokens per row (default 256)")
    lm.add_argument("--vocab-size", type=int, help=f"BPE vocabulary (default {text.SHAPE['vocab_size']})")
    lm.add_argument("--d-model", dest="hidden_size", type=int, help=f"default {text.SHAPE['hidden_size']}")
    lm.add_argument("--layers", dest="num_hidden_layers", type=int,
                    help=f"default {text.SHAPE['num_hidden_layers']}")
    vim.add_argument("--image-size", dest="img_size", type=int, help=f"default {images.SHAPE['img_size']}")
    vim.add_argument("--patch-size", type=int, help=f"default {images.SHAPE['patch_size']}")
    vim.add_argument("--embed-dim", dest="hidden_size", type=int, help=f"default {images.SHAPE['hidden_size']}")
    vim.add_argument("--depth", dest="num_hidden_layers", type=int, help=f"default {images.SHAPE['num_hidden_layers']}")


def run(args):
    from ..pretrain import images, text
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                  eval_every=args.eval_every, weight_decay=args.weight_decay, validation=args.validation,
                  seed=args.seed, device=args.device)
    for key in ("steps", "batch_size", "eval_every"):
        if common[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')}: expected a positive integer, got {common[key]}")
    if not 0 < args.validation < 0.5:
        raise UsageError(f"--validation: expected a fraction in (0, 0.5), got {args.validation}")
    shape = {k: getattr(args, k) for k in ("hidden_size", "num_hidden_layers")}
    if args.kind == "lm":
        if args.seq_len < 2 or (args.vocab_size is not None and args.vocab_size < 300):
            raise UsageError("--seq-len: expected at least 2; --vocab-size: at least 300 (256 bytes + merges)")
        s = text.pretrain(args.corpus_dir, args.out_dir, seq_len=args.seq_len, vocab_size=args.vocab_size,
                          **shape, **common)
        r = s["result"]
        print(f"language model: {args.out_dir} ({s['parameters']:,d} parameters, {s['weights_bytes'] / 1e6:.1f} MB; "
              f"{s['corpus']['train_tokens']:,d} training tokens, vocabulary {s['tokenizer']['vocab_size']}); "
              f"validation loss {r['validation_loss']:.4f}, perplexity {r['validation_perplexity']:.2f} "
              f"(step {r['best_step']}); curves in {args.out_dir}/run/curves.png")
    else:
        s = images.pretrain(args.corpus_dir, args.out_dir, img_size=args.img_size, patch_size=args.patch_size,
                            **shape, **common)
        v = s["result"]["validation"]
        print(f"vision model: {args.out_dir} ({s['parameters']:,d} parameters, {s['weights_bytes'] / 1e6:.1f} MB; "
              f"{s['corpus']['train_images']:,d} training images, {s['config']['num_classes']} classes); held-out "
              f"accuracy {v['acc']:.4f} ({', '.join(f'{k[4:]} {x:.4f}' for k, x in v.items() if k.startswith('acc_'))}; "
              f"step {s['result']['best_step']}); curves in {args.out_dir}/run/curves.png")
