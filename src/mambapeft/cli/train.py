"""`mambapeft train CONFIG.yaml [key=value ...]`: fine-tune as a YAML config says."""
import argparse

EPILOG = """\
overrides: key=value pairs set a config key by its dotted path, the value read as YAML, e.g.
  training.lr=3e-4 training.batch_size=64 methods.lora_X.r=16 output_dir=runs/b

several processes: torchrun --nproc-per-node N -m mambapeft.cli train CONFIG.yaml
  (or accelerate launch); the effective batch stays training.batch_size.

run directory (output_dir): config.yaml (the resolved config), log.jsonl, tensorboard/,
checkpoints/step-N/, best/ and last/ (adapters), metrics.json, curves.png; see README.md.

output: the final metrics as JSON on stdout; then, on stderr, a summary: each test metric of the base
model (training.eval_base) -> the fine-tuned one, the trainable parameters, the adapters and curves.

"""


def add_parser(sub):
    from ..training.config import help_text
    p = sub.add_parser("train", help="fine-tune a model with PEFT methods as a YAML config says",
                       description=__doc__, epilog=EPILOG + help_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML file with model, methods, task, training, output_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its newest checkpoint (same config)")


def run(args):
    import json
    import logging
    import os
    import sys
    import torch.distributed as dist
    from ..training.config import load_config
    from ..training.logs import summary
    from ..training.trainer import train
    config = load_config(args.config, args.overrides)
    log = logging.getLogger("mambapeft")   # our notes (e.g. training.cuda_graph's counts), not other libraries'
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        result = train(config, resume=args.resume)
    finally:
        if dist.is_initialized():   # torchrun: leave the process group cleanly, error or not
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2), flush=True)   # stdout stays one JSON document
        print(summary(result, config["output_dir"]), file=sys.stderr)
