"""`mambapeft merge RUN_DIR OUT_DIR`: fold a run's adapter into its base model and save that in
Hugging Face format (readable by transformers.MambaForCausalLM for a language model)."""
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("merge", help="write a run's base model with its adapter merged in (Hugging Face format)",
                       description=__doc__)
    p.add_argument("run_dir", help="a run directory written by mambapeft train")
    p.add_argument("out_dir", help="where to write the merged model (must not exist or be empty)")
    p.add_argument("--adapter", choices=["best", "last"], default="best",
                   help="which adapter of the run to merge (default: best)")


def run(args):
    import shutil
    import yaml
    from . import UsageError
    from ..peft import PeftModel
    from ..training.config import validate
    from ..training.task import build_task
    run_dir, out = Path(args.run_dir), Path(args.out_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    adapter = run_dir / args.adapter
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{adapter}: no adapter (the run has not written its {args.adapter} adapter yet)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty directory")
    config = validate(yaml.safe_load(cfg_path.read_text()), str(cfg_path))
    task = build_task(config["task"], f"{cfg_path}: task")
    peft = PeftModel.from_pretrained(task.load_model(config["model"]), adapter)
    left = peft.unmergeable_methods()
    if left:
        raise UsageError(f"{adapter}: cannot merge {', '.join(left)} into the base weights (they change the "
                         "sequence or the state size); load the adapter with PeftModel.from_pretrained instead")
    model = peft.merge_and_unload()
    model.save_pretrained(out)
    from . import DEFAULT_MODEL
    from ..io import CheckpointError, resolve_dir
    try:   # the base model's directory (a hub id: its local cache), for the tokenizer files
        # the folder the task loaded (task.suite: default resolves model: {} to the shipped model)
        src = resolve_dir(getattr(task, "model_path", None) or config["model"].get("path") or DEFAULT_MODEL)
    except CheckpointError:
        src = None
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):   # keep it usable alone
        if src is not None and (src / name).is_file():
            shutil.copy(src / name, out / name)
    print(f"merged {', '.join(peft.peft_config.methods)} from {adapter} into {out}")
