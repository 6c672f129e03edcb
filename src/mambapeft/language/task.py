"""Task type "language": fine-tune a Mamba language model on instruction data (commonsense_170k
format, Alpaca template) and evaluate zero-shot multiple choice during and after training.

    task:
      type: language
      data: commonsense_170k.json      # JSON list or JSON lines of {instruction, input, output, answer?}
      validation_size: 2000            # held out (seeded) for the validation loss
      cutoff: 256                      # tokens; longer records are cut (overlong: truncate) or dropped (drop)
      pad_to_multiple_of: 1            # batch lengths rounded up to this: few shapes for training.cuda_graph
      eval_tasks: [piqa, my_task.yaml] # lm-eval multiple-choice tasks, run after training ("test")
      eval_during_training: false      # also run them at every validation
      metric: loss                     # or acc (mean over eval_tasks), or TASK/acc, TASK/acc_norm
      suite: default                   # the shipped suite (default/shipped.py): data defaults to its
                                       # train.json, eval_tasks to its four tasks (by name or all), and
                                       # a model section without a path to the shipped mamba-default
"""
import logging

import torch

from ..models.mixer import MixerAdapter
from ..peft.config import ConfigError
from ..training.task import register_task
from . import data

log = logging.getLogger(__name__)

SETTINGS = {"data": None, "tokenizer": None, "template": "alpaca", "cutoff": 256, "train_on_inputs": False,
            "overlong": "truncate", "validation_size": 2000, "seed": 42, "eval_tasks": [],
            "eval_during_training": False, "eval_data_dir": None, "eval_batch_size": 32, "eval_limit": None,
            "metric": "loss", "suite": None, "pad_to_multiple_of": 1}


def _check(section, source):
    unknown = sorted(set(section) - set(SETTINGS) - {"type"})
    if unknown:
        raise ConfigError(f"{source}.{unknown[0]}: unknown setting; expected one of {', '.join(SETTINGS)}")
    s = {**SETTINGS, **section}
    def need(ok, key, what):
        if not ok:
            raise ConfigError(f"{source}.{key}: expected {what}, got {s[key]!r}")
    need(s["suite"] in (None, "default"), "suite", "default (the shipped language suite) or null")
    if s["suite"] == "default":
        _use_suite(s)
    need(isinstance(s["data"], str) and s["data"], "data", "the path of a JSON or JSON lines instruction file")
    need(s["tokenizer"] is None or isinstance(s["tokenizer"], str), "tokenizer", "a directory or hub id")
    need(s["template"] in data.TEMPLATES, "template", " or ".join(data.TEMPLATES))
    for key, low in (("cutoff", 2), ("validation_size", 0), ("seed", 0), ("eval_batch_size", 1),
                     ("pad_to_multiple_of", 1)):
        need(isinstance(s[key], int) and not isinstance(s[key], bool) and s[key] >= low, key, f"an integer >= {low}")
    need(s["eval_limit"] is None or (isinstance(s["eval_limit"], int) and s["eval_limit"] > 0), "eval_limit",
         "a number of documents > 0 or null")
    need(s["overlong"] in ("truncate", "drop"), "overlong", "truncate or drop")
    for key in ("train_on_inputs", "eval_during_training"):
        need(isinstance(s[key], bool), key, "true or false")
    if isinstance(s["eval_tasks"], str):
        s["eval_tasks"] = [s["eval_tasks"]]
    need(isinstance(s["eval_tasks"], list) and all(isinstance(t, str) for t in s["eval_tasks"]), "eval_tasks",
         "a list of lm-eval task names or YAML files")
    m = s["metric"]
    need(isinstance(m, str), "metric", "loss, acc or TASK/acc")
    if m != "loss":
        need(s["eval_tasks"], "metric", "loss when eval_tasks is empty")
        need(m == "acc" or (m.count("/") == 1 and m.split("/")[1] in ("acc", "acc_norm")), "metric",
             "loss, acc (the mean over eval_tasks), TASK/acc or TASK/acc_norm")
    elif s["validation_size"] == 0:
        raise ConfigError(f"{source}.metric: loss needs validation_size > 0 (or pick a task's acc)")
    return s


def _use_suite(s):
    """The shipped suite's training file and tasks where the section names none; a task of the suite
    may be named by its name (fortune_topic) rather than its YAML path."""
    from ..default import shipped
    tasks = shipped.language_tasks()
    if s["data"] is None:
        s["data"] = str(shipped.language_suite_dir() / "train.json")
    names = [s["eval_tasks"]] if isinstance(s["eval_tasks"], str) else s["eval_tasks"]
    if names == [] or names == ["all"]:
        s["eval_tasks"] = list(tasks.values())
    elif isinstance(names, list):
        s["eval_tasks"] = [tasks.get(t, t) if isinstance(t, str) else t for t in names]


class LanguageTask:
    unit = "tokens"

    def __init__(self, section, source="task"):
        self.s = _check(section, source)
        self.source = source
        self.metric = self.s["metric"]
        self.greater_is_better = self.metric != "loss"
        self.model_path = None
        self._tokenizer = self._splits = self._eval = None

    def __getstate__(self):   # DataLoader workers need collate(), not the tokenizer or the task data
        return {**self.__dict__, "_tokenizer": None, "_eval": None}

    # ---- the engine's contract ----------------------------------------------------------------
    def load_model(self, model_section):
        from ..cli import DEFAULT_MODEL
        from ..default.shipped import resolve_model
        from ..models import MambaForCausalLM
        default = "mamba-default" if self.s["suite"] == "default" else None
        self.model_path = resolve_model(model_section.get("path"), default) or DEFAULT_MODEL
        return MambaForCausalLM.from_pretrained(self.model_path, dtype=None)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..models.checkpoint import load_tokenizer
            name = self.s["tokenizer"] or self.model_path
            if name is None:
                raise ConfigError(f"{self.source}.tokenizer: needed before the model is loaded")
            self._tokenizer = load_tokenizer(name)
        return self._tokenizer

    @property
    def pad_id(self):
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id

    def splits(self):
        if self._splits is None:
            s = self.s
            records = data.read_records(s["data"])
            items = data.tokenize(records, self.tokenizer, s["template"], s["cutoff"], s["train_on_inputs"],
                                  s["overlong"], source=s["data"])
            train, val = data.split(items, s["validation_size"], s["seed"])
            log.info("%s: %d training and %d validation records", s["data"], len(train), len(val))
            if self.metric != "loss":
                self.eval_tasks()   # a missing task or its data found now, not after the first epoch
            self._splits = {"train": train, "validation": val, "_pad": self.pad_id}
        return self._splits

    def train_set(self):
        return self.splits()["train"]

    def collate(self, items):
        return data.collate(items, self.splits()["_pad"], self.s["pad_to_multiple_of"])

    def loss(self, model, batch):
        count = (batch["labels"][:, 1:] != -100).sum()
        # Batches are right-padded (data.collate) and the model is causal: no real token comes after
        # a pad, and pads carry no label, so the mask changes nothing the loss sees, unless a method
        # places tokens by each row's real length. Without it the CUDA path takes its fused kernels.
        mask = batch["attention_mask"] if _reads_padding(model) else None
        out = model(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        return out.loss.float() * count, count

    @torch.no_grad()
    def evaluate(self, model, split):
        run_tasks = bool(self.s["eval_tasks"]) and (split == "test" or self.s["eval_during_training"]
                                                    or self.metric != "loss")
        has_loss = split == "validation" and self.s["validation_size"] > 0
        if split not in ("validation", "test") or not (run_tasks or has_loss):
            raise KeyError(split)
        out = {"loss": self.validation_loss(model)} if has_loss else {}
        if run_tasks:
            out.update(self.task_metrics(model))
        return out

    # ---- evaluation ---------------------------------------------------------------------------
    def validation_loss(self, model):
        device = next(model.parameters()).device
        val, bs = self.splits()["validation"], self.s["eval_batch_size"]
        total, count = 0.0, 0
        for i in range(0, len(val), bs):
            batch = {k: v.to(device) for k, v in self.collate(val[i:i + bs]).items()}
            loss, n = self.loss(model, batch)
            total, count = total + float(loss), count + int(n)
        return total / count

    def eval_tasks(self):
        """The lm-eval tasks, loaded once; a metric naming a task that is not among them is a config error."""
        from . import multiple_choice as mc
        if self._eval is None:
            self._eval = [mc.load_task(t, self.s["eval_data_dir"]) for t in self.s["eval_tasks"]]
            names = [t.config.task for t in self._eval]
            if "/" in self.metric and self.metric.split("/")[0] not in names:
                raise ConfigError(f"{self.source}.metric: {self.metric}: no task {self.metric.split('/')[0]!r} "
                                  f"among eval_tasks ({', '.join(names)})")
        return self._eval

    def task_metrics(self, model):
        from . import multiple_choice as mc
        res = mc.evaluate(model, self.tokenizer, self.eval_tasks(), self.s["eval_batch_size"], self.s["eval_limit"])
        out = {f"{name}/{k}": v for name, r in res.items() for k, v in r.items() if k != "n"}
        out["acc"] = sum(r["acc"] for r in res.values()) / len(res)
        return out


def _reads_padding(model):
    """Does an active mixer adapter place tokens by where the padding is (MixerAdapter.reads_padding)?"""
    return any(isinstance(m, MixerAdapter) and m.active and m.reads_padding() for m in model.modules())


@register_task("language")
def _language(section, source):
    return LanguageTask(section, source)
