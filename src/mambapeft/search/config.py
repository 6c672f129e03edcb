"""The search config: a training config (model, task, training, output_dir) without methods, with
`tasks` for several tasks and a `search` section. Paths are read from the working directory, as
`mambapeft train` reads them.

    model: path/or/hub-id
    task: {type: toy}                 # or tasks: [{type: vision, name: cifar}, ...] (scores averaged)
    training: {lr: 1e-3, max_steps: 20, eval_every: 5}
    output_dir: runs/search
    search:
      space: null                     # a file overriding the shipped space.yaml
      trials: {step1: 100, step2: 100}   # or one number for both steps
      pruner: {type: median}          # median, halving or none (settings: see PRUNERS)
      storage: null                   # an Optuna database URL; default sqlite:///OUTPUT_DIR/study.db
      study: null                     # default: the config file's name
      seed: 0
      heartbeat_interval: 30          # seconds; a trial silent for grace_period is failed and retried
      grace_period: null              # default 2 x heartbeat_interval
      max_retry: 3                    # retries of a trial whose worker died
      max_failures: null              # stop after this many failed trials (default: max(trials, 10))
      final_task: {}                  # merged into each task for the final run on its test split
      threads: null                   # torch CPU threads per worker (default: torch's choice); with
                                      # several workers on one machine, cores / workers
"""
import copy
from pathlib import Path

from ..peft.config import ConfigError
from ..training.config import read_yaml

SEARCH = {"space": None, "trials": {"step1": 100, "step2": 100}, "pruner": {"type": "median"}, "storage": None,
          "study": None, "seed": 0, "heartbeat_interval": 30, "grace_period": None, "max_retry": 3,
          "max_failures": None,
          "final_task": {}, "threads": None}
PRUNERS = {"median": {"startup_trials": 5, "warmup_steps": 0},
           "halving": {"min_resource": 1, "reduction_factor": 3},
           "none": {}}
TOP = {"model", "task", "tasks", "training", "output_dir", "search"}


def load_search_config(path, storage=None, study=None, trials=None):
    path = Path(path)
    raw = read_yaml(path)
    src = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a mapping of model, task, training, output_dir, search")
    unknown = sorted(set(raw) - TOP)
    if unknown:
        hint = " (the search chooses the methods)" if unknown == ["methods"] else ""
        raise ConfigError(f"{src}: unknown key {unknown[0]!r}{hint}; expected {', '.join(sorted(TOP))}")
    if ("task" in raw) == ("tasks" in raw):
        raise ConfigError(f"{src}: give exactly one of task (a mapping) or tasks (a list of mappings)")
    tasks = [raw["task"]] if "task" in raw else raw["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) and "type" in t for t in tasks):
        raise ConfigError(f"{src}: tasks: expected a non-empty list of mappings, each with a 'type'")
    model = raw.get("model")
    model = {"path": model} if isinstance(model, str) else model
    if not isinstance(model, dict):   # {}: the task's own default model, as in mambapeft train
        raise ConfigError(f"{src}: model: expected a path, hub id or mapping")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise ConfigError(f"{src}: training: expected a mapping of training settings")
    from ..training.config import validate   # the training section as the engine reads it, before any trial
    validate({"model": model, "methods": {"lora_X": {}}, "task": tasks[0], "training": training, "output_dir": "-"},
             src)
    s = raw.get("search") or {}
    if not isinstance(s, dict):
        raise ConfigError(f"{src}: search: expected a mapping")
    unknown = sorted(set(s) - set(SEARCH))
    if unknown:
        raise ConfigError(f"{src}: search.{unknown[0]}: unknown setting; expected one of {', '.join(SEARCH)}")
    s = {**copy.deepcopy(SEARCH), **s}
    s["trials"] = _trials(s["trials"] if trials is None else trials, f"{src}: search.trials")
    s["pruner"] = _pruner(s["pruner"], f"{src}: search.pruner")
    for key, low in (("heartbeat_interval", 1), ("max_retry", 0), ("seed", 0)):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < low:
            raise ConfigError(f"{src}: search.{key}: expected an integer >= {low}, got {s[key]!r}")
    for key in ("max_failures", "threads"):
        v = s[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{src}: search.{key}: expected an integer >= 1 or null, got {v!r}")
    grace = s["grace_period"]
    if grace is not None and (not isinstance(grace, int) or grace <= s["heartbeat_interval"]):
        raise ConfigError(f"{src}: search.grace_period: expected an integer above heartbeat_interval, got {grace!r}")
    if not isinstance(s["final_task"], dict):
        raise ConfigError(f"{src}: search.final_task: expected a mapping merged into each task")
    out = Path(raw.get("output_dir") or f"runs/search-{path.stem}")   # paths as `mambapeft train` reads them
    s["study"] = study or s["study"] or path.stem
    s["storage"] = storage or s["storage"] or f"sqlite:///{(out / 'study.db').resolve()}"
    return {"model": model, "tasks": tasks, "training": training, "output_dir": out, "search": s, "source": src}


def _trials(value, where):
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"step1": value, "step2": value}
    if not isinstance(value, dict) or set(value) - {"step1", "step2"} or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values()):
        raise ConfigError(f"{where}: expected a number >= 1 or {{step1: N, step2: M}}, got {value!r}")
    return {"step1": value.get("step1", 100), "step2": value.get("step2", 100)}


def _pruner(value, where):
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or value.get("type") not in PRUNERS:
        raise ConfigError(f"{where}: expected {{type: {'|'.join(PRUNERS)}, ...}}, got {value!r}")
    allowed = PRUNERS[value["type"]]
    unknown = sorted(set(value) - set(allowed) - {"type"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown setting for the {value['type']} pruner; "
                          f"expected {', '.join(allowed) or 'none'}")
    return {**allowed, **value}
