"""The training configuration: a YAML file, `key=value` overrides, validation with one-line errors.

    model: path/or/hub-id            # or a mapping {path: ..., ...} the task reads
    methods: {lora_X: {r: 8}}        # or a preset name ("lora_X", "sll_lora", ...)
    task: {type: toy, ...}           # see training/task.py
    training: {lr: 1e-3, batch_size: 32, ...}   # TRAINING below
    output_dir: runs/my-run
"""
import copy
from pathlib import Path

import yaml

from ..peft.config import ConfigError

# Every training setting: default and what it means (`mambapeft train --help` prints this table).
TRAINING = {
    "lr": (1e-3, "peak learning rate (each method scales it by its lr_mult)"),
    "weight_decay": (0.0, "AdamW weight decay (each method scales it by its wd_mult)"),
    "betas": ([0.9, 0.999], "AdamW betas"),
    "eps": (1e-8, "AdamW epsilon"),
    "batch_size": (32, "effective batch: items per optimizer step, summed over processes"),
    "micro_batch_size": (None, "items per forward pass and process (default: batch_size); the rest is accumulated"),
    "epochs": (1.0, "passes over the training set (may be fractional); ignored when max_steps is set"),
    "max_steps": (None, "optimizer steps to run (default: from epochs)"),
    "warmup_steps": (0, "linear warmup from 0 to lr over this many steps"),
    "warmup_ratio": (0.0, "warmup as a fraction of all steps (used when warmup_steps is 0)"),
    "schedule": ("cosine", "decay after warmup: cosine, linear or constant"),
    "min_lr_ratio": (0.0, "the floor the decay ends at, as a fraction of lr"),
    "grad_clip": (1.0, "clip the global gradient norm to this (0: no clipping)"),
    "seed": (0, "seed of the sample order, the adapters' initialisation and dropout"),
    "eval_every": (None, "evaluate every N steps (default: at the end of each epoch; 0: only at the end)"),
    "save_every": (None, "checkpoint every N steps (default: at each evaluation)"),
    "keep_checkpoints": (2, "keep at most this many checkpoints (the newest)"),
    "precision": ("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32"),
    "frozen_dtype": ("auto", "dtype of the frozen mixer weights only matmuls read (in_proj, out_proj, x_proj, "
                     "dt_proj): auto (bf16 under bf16 autocast: the same results without autocast's per-step "
                     "casts and their saved copies), bf16 (needs bf16 autocast) or fp32 (as loaded)"),
    "memory_efficient_norm": (False, "under bf16 autocast every RMSNorm returns bf16 and keeps that output for its "
                              "backward instead of its fp32 input (the residual stream: 4 bytes a value a layer): "
                              "the same forward, gradients within bf16 rounding; needs bf16 autocast"),
    "recompute_z": (False, "on CUDA's fused route keep only the x half of in_proj's output for backward and make "
                    "the z half (the gate) again there: 2 bytes a value of z less a layer under bf16, for one more "
                    "product of in_proj's z rows (same results; affix prefixes keep theirs); true (every layer), "
                    "false or a number n (the first n layers)"),
    "device": ("auto", "auto (cuda:LOCAL_RANK when CUDA is there), cpu or cuda"),
    "cuda_graph": (False, "replay each micro-batch's forward and backward from a CUDA graph captured per input "
                   "shape: no launch gaps on small models; dropout draws differ from eager; with several "
                   "processes the gradients are summed after the backward passes, not during them"),
    "num_workers": (0, "DataLoader worker processes per training process"),
    "log_every": (1, "steps between updates of the progress bar's numbers (log.jsonl has every step)"),
    "progress": (True, "show a tqdm progress bar"),
    "eval_base": (False, "evaluate the base model on validation and test before the first step (adapters "
                  "disabled; methods that cannot be, e.g. full or head, as initialised): metrics.json's base"),
}
SECTIONS = {
    "model": "the base model: a local directory or hub id, or a mapping the task reads (path: ...)",
    "methods": "PEFT methods: a mapping like {lora_X: {r: 8}} or a preset name (mambapeft methods)",
    "task": "the task: {type: language|vision|toy, ...}, see the task's documentation",
    "training": "training settings (below)",
    "output_dir": "the run directory (must be new or empty unless --resume)",
}


def _expect(cond, source, key, what):
    if not cond:
        raise ConfigError(f"{source}: {key}: expected {what}")


def read_yaml(path):
    """A YAML file's contents ({} for an empty file); a missing or malformed file is one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).replace("\n", " ")
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    return {} if data is None else data


def load_config(path, overrides=()):
    """Read a YAML config, apply `key=value` overrides (values typed by YAML), validate."""
    path = Path(path)
    raw = read_yaml(path)
    _expect(isinstance(raw, dict), str(path), "top level", "a mapping of model, methods, task, training, output_dir")
    raw = apply_overrides(raw, overrides)
    return validate(raw, str(path))


def apply_overrides(raw, overrides):
    """`a.b.c=value`: set raw[a][b][c] to the YAML reading of value (so 1e-3 is a float, true a bool)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. training.lr=1e-3")
        key, value = item.split("=", 1)
        try:
            value = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if part in node and node[part] is not None and not isinstance(node[part], dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def validate(raw, source="config"):
    """The resolved config: every section present, training settings filled with defaults and typed."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; expected {', '.join(SECTIONS)}")
    for key in ("model", "methods", "task", "output_dir"):
        if raw.get(key) in (None, ""):
            raise ConfigError(f"{source}: {key}: missing ({SECTIONS[key]})")
    model = raw["model"]
    if isinstance(model, str):
        model = {"path": model}
    _expect(isinstance(model, dict), source, "model", "a path, hub id or mapping")
    methods = raw["methods"]
    _expect(isinstance(methods, (str, dict)), source, "methods", "a mapping of method settings or a preset name")
    _expect(isinstance(raw["task"], dict) and "type" in raw["task"], source, "task", "a mapping with a 'type'")
    _expect(isinstance(raw["output_dir"], str), source, "output_dir", "a directory path")
    t = raw.get("training") or {}
    _expect(isinstance(t, dict), source, "training", "a mapping of training settings")
    unknown = sorted(set(t) - set(TRAINING))
    if unknown:
        raise ConfigError(f"{source}: training.{unknown[0]}: unknown setting; expected one of {', '.join(TRAINING)}")
    t = {k: t.get(k, copy.deepcopy(d)) for k, (d, _) in TRAINING.items()}
    _check_training(t, source)
    return {"model": model, "methods": methods, "task": raw["task"], "training": t, "output_dir": raw["output_dir"]}


def _number(t, key, source, kind=float, low=None, optional=False, positive=False):
    v = t[key]
    if v is None and optional:
        return
    if isinstance(v, str):   # PyYAML reads 1e-3 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind is int:
        ok = ok and float(v).is_integer()
    if ok and low is not None:
        ok = v > low if positive else v >= low
    what = ("an integer" if kind is int else "a number") + \
        ("" if low is None else f" {'>' if positive else '>='} {low}") + (" or null" if optional else "")
    _expect(ok, source, f"training.{key}", f"{what}, got {v!r}")
    t[key] = kind(v)


def _check_training(t, source):
    for key in ("lr", "eps"):
        _number(t, key, source, low=0, positive=True)
    for key in ("weight_decay", "warmup_ratio", "min_lr_ratio", "grad_clip"):
        _number(t, key, source, low=0)
    _number(t, "epochs", source, low=0, positive=True)
    for key in ("batch_size", "keep_checkpoints", "log_every"):
        _number(t, key, source, kind=int, low=0, positive=True)
    for key in ("warmup_steps", "seed", "num_workers"):
        _number(t, key, source, kind=int, low=0)
    _number(t, "micro_batch_size", source, kind=int, low=0, positive=True, optional=True)
    _number(t, "max_steps", source, kind=int, low=0, positive=True, optional=True)
    _number(t, "eval_every", source, kind=int, low=0, optional=True)
    _number(t, "save_every", source, kind=int, low=0, positive=True, optional=True)
    b = t["betas"]
    _expect(isinstance(b, list) and len(b) == 2 and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b),
            source, "training.betas", f"two numbers in [0, 1), got {b!r}")
    for key, choices in (("schedule", ("cosine", "linear", "constant")), ("precision", ("auto", "bf16", "fp32")),
                         ("frozen_dtype", ("auto", "bf16", "fp32")), ("device", ("auto", "cpu", "cuda"))):
        _expect(t[key] in choices, source, f"training.{key}", f"one of {', '.join(choices)}, got {t[key]!r}")
    _expect(not (t["frozen_dtype"] == "bf16" and t["precision"] == "fp32"), source, "training.frozen_dtype",
            "auto or fp32 with precision fp32 (bf16 weights need bf16 autocast)")
    _expect(not (t["memory_efficient_norm"] is True and t["precision"] == "fp32"), source,
            "training.memory_efficient_norm", "false with precision fp32 (it needs bf16 autocast)")
    _expect(t["min_lr_ratio"] <= 1, source, "training.min_lr_ratio", "a number in [0, 1]")
    for key in ("progress", "eval_base", "cuda_graph", "memory_efficient_norm"):
        _expect(isinstance(t[key], bool), source, f"training.{key}", "true or false")
    z = t["recompute_z"]
    _expect(isinstance(z, bool) or (isinstance(z, int) and z >= 0), source, "training.recompute_z",
            f"true, false or a number of layers >= 0, got {z!r}")


def dump_config(config):
    return yaml.safe_dump(config, sort_keys=False)


def help_text():
    lines = ["config sections:"] + [f"  {k:<12} {v}" for k, v in SECTIONS.items()]
    lines += ["training settings (training.KEY, default):"]
    w = max(map(len, TRAINING)) + 1
    lines += [f"  {k:<{w}} {d!s:<8} {h}" for k, (d, h) in TRAINING.items()]
    return "\n".join(lines)
