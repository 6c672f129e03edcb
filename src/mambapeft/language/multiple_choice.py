"""Zero-shot multiple choice, fast: the log-likelihood of each choice given its context, batched over
choices and documents, scored with acc / acc_norm exactly as lm-evaluation-harness scores them.

Tasks are lm-evaluation-harness tasks: a YAML file in its format (doc_to_text, doc_to_choice,
doc_to_target, target_delimiter, dataset_path: json + dataset_kwargs.data_files for local JSON lines),
or the name of one of its tasks. The harness itself builds the documents, contexts and metrics
(`ConfigurableTask`), so prompts and acc_norm cannot drift from it; only the model calls are ours.
Note: in lm-eval 0.4.13 acc_norm divides each choice's log-likelihood by its length in characters
(`len(choice)`); `acc_bytes` is the byte-length variant."""
import logging
from collections import defaultdict
from pathlib import Path

import torch

from ..cli import UsageError
from .data import DataError

log = logging.getLogger(__name__)

# The paper's eight tasks and where lm-eval 0.4.13 keeps their YAML (under lm_eval/tasks).
PAPER_TASKS = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "social_iqa": "siqa/siqa.yaml",
               "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
               "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
               "openbookqa": "openbookqa/openbookqa.yaml"}
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ---- tasks ------------------------------------------------------------------------------------
def task_specs(tasks):
    """A comma-separated string or list of task names / YAML paths; "paper" means the eight tasks."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = []
    for n in (str(n).strip() for n in names):
        if n:
            out.extend(PAPER_TASKS if n == "paper" else [n])
    if not out:
        raise UsageError("--tasks: expected task names or YAML files, got none")
    return out


def load_task(spec, data_dir=None):
    """An lm-eval ConfigurableTask from a YAML path or a task name. A named task's data comes from the
    local hub cache, or from `data_dir`/NAME/SPLIT.jsonl (rows in the hub data set's own format)."""
    import lm_eval.tasks._yaml_loader as yaml_loader
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise DataError(f"{spec}: task file not found")
        cfg = _read_yaml(yaml_loader, path)
        _resolve_data_files(cfg, path)
    elif spec in PAPER_TASKS:
        import lm_eval
        cfg = _read_yaml(yaml_loader, Path(lm_eval.__file__).parent / "tasks" / PAPER_TASKS[spec])
    else:
        return _named_task(spec, data_dir)
    name = cfg.get("task", spec)
    if cfg.get("output_type") != "multiple_choice":
        raise DataError(f"{spec}: output_type: expected multiple_choice, got {cfg.get('output_type')!r}")
    looked = None
    if data_dir is not None and not spec.endswith((".yaml", ".yml")):
        looked = _use_data_dir(cfg, Path(data_dir) / name)
    return _build(cfg, spec, name, looked)


def _read_yaml(yaml_loader, path):
    try:
        cfg = yaml_loader.load_yaml(path)
    except Exception as e:   # YAML syntax, a missing include or !function module
        raise DataError(f"{path}: not a usable lm-eval task file ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(cfg, dict) or not cfg.get("task"):
        raise DataError(f"{path}: expected an lm-eval task (a mapping with task, dataset_path, doc_to_text, ...)")
    for key in ("tag", "group"):   # task-manager grouping, not task settings
        cfg.pop(key, None)
    return cfg


def _resolve_data_files(cfg, yaml_path):
    """Relative data_files that do not exist from the working directory are read beside the YAML."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return
    def fix(f):
        p = Path(f)
        if not p.is_absolute() and not p.exists() and (yaml_path.parent / p).exists():
            p = yaml_path.parent / p
        if not p.exists():
            raise DataError(f"{yaml_path}: dataset_kwargs.data_files: {f}: file not found")
        return str(p)
    if isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {k: ([fix(x) for x in v] if isinstance(v, list) else fix(v))
                                               for k, v in files.items()}
    else:
        cfg["dataset_kwargs"]["data_files"] = [fix(x) for x in files] if isinstance(files, list) else fix(files)


def _use_data_dir(cfg, folder):
    """Point the task at folder/SPLIT.{jsonl,json,parquet,csv} when the folder has its evaluation split."""
    split = cfg.get("test_split") or cfg.get("validation_split")
    found = {}
    for key in ("training_split", "validation_split", "test_split"):
        s = cfg.get(key)
        for suffix in DATA_SUFFIXES:
            if s and (folder / f"{s}{suffix}").is_file():
                found[key] = (s, folder / f"{s}{suffix}")
                break
    eval_key = "test_split" if cfg.get("test_split") else "validation_split"
    if eval_key not in found:
        return f"{folder}/{split}.jsonl"
    kinds = {DATA_SUFFIXES[p.suffix] for _, p in found.values()}
    if len(kinds) > 1:
        raise DataError(f"{folder}: split files of different formats ({', '.join(sorted(kinds))}); use one")
    cfg.update(dataset_path=kinds.pop(), dataset_name=None,
               dataset_kwargs={"data_files": {s: str(p) for s, p in found.values()}})
    for key in ("training_split", "validation_split", "test_split"):
        if key not in found:
            cfg[key] = None
    cfg.pop("fewshot_split", None)
    return None


def _build(cfg, spec, name, looked=None):
    import datasets
    from lm_eval.api.task import ConfigurableTask
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()   # per-split bars for files of a few MB: noise before an error line
    try:
        return ConfigurableTask(config=cfg)
    except Exception as e:
        where = cfg.get("dataset_path")
        if cfg.get("dataset_name"):
            where = f"{where} ({cfg['dataset_name']})"
        if where not in ("json", "parquet", "csv"):
            import huggingface_hub.constants as hub
            also = f", nor in {looked}" if looked else " (or pass --data-dir DIR holding NAME/SPLIT.jsonl)"
            raise DataError(f"{name}: data set {where} is not in the local hub cache ({hub.HF_HUB_CACHE}, "
                            f"{datasets.config.HF_DATASETS_CACHE}){also}: {type(e).__name__}: "
                            f"{_first_line(e)}") from None
        raise DataError(f"{spec}: cannot load the task's data ({type(e).__name__}: {_first_line(e)})") from None
    finally:
        if shown:
            datasets.enable_progress_bars()


def _first_line(e):
    return (str(e).strip().splitlines() or [""])[0]


def _named_task(name, data_dir):
    """Any other lm-eval task, through its task index (slower: it reads every task's YAML first)."""
    import lm_eval.tasks._yaml_loader as yaml_loader
    from lm_eval.tasks import TaskManager
    entry = TaskManager().task_index.get(name)
    if entry is None or entry.yaml_path is None or entry.kind.name.lower() != "task":
        raise UsageError(f"--tasks: {name}: expected one of {', '.join(PAPER_TASKS)}, 'paper', a YAML file or "
                         "the name of an lm-eval task")
    cfg = _read_yaml(yaml_loader, entry.yaml_path)
    if cfg.get("output_type") != "multiple_choice":
        raise UsageError(f"--tasks: {name}: a {cfg.get('output_type')} task; this scorer runs multiple_choice "
                         "tasks (run others with `mambapeft lm-eval`)")
    looked = _use_data_dir(cfg, Path(data_dir) / name) if data_dir is not None else None
    return _build(cfg, name, name, looked)


def documents(task, limit=None):
    """[(doc, [(context, continuation) per choice])] in the harness's order, zero-shot."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    docs = defaultdict(list)
    for inst in task.instances:
        docs[inst.doc_id].append(inst)
    return [(insts[0].doc, [i.arguments for i in sorted(insts, key=lambda i: i.idx)])
            for _, insts in sorted(docs.items())]


# ---- scoring ----------------------------------------------------------------------------------
def encode_pair(tokenizer, context, continuation, prefix_id):
    """Token ids of (context, continuation) split as lm-eval splits them: trailing spaces of the context
    move to the continuation, the whole text is encoded once and cut at the context's length; an empty
    context becomes the prefix token (BOS, else EOS)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    if context == "":
        cont = enc(continuation)
        return ([prefix_id], cont) if cont[:1] != [prefix_id] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = enc(context)
    return ctx, enc(context + continuation)[len(ctx):]


@torch.no_grad()
def score(model, pairs, batch_size=32, pad_id=0):
    """[(sum of continuation log-probs, whether greedy decoding gives the continuation)] for token
    pairs (context_ids, continuation_ids).

    Each distinct context runs once: `batch_size` contexts, left-padded (padding before the first real
    token leaves the recurrent state at zero), end in a recurrent state that is copied to each of their
    continuations, which then run from it, right-padded (padding after a row's last token changes
    nothing it sees). The choices of a question share the question, so this reads it once, not once
    per choice."""
    from ..models.cache import MambaCache
    groups = defaultdict(list)   # context -> indices of the pairs that continue it
    for i, (c, _) in enumerate(pairs):
        groups[tuple(c)].append(i)
    contexts = sorted(groups, key=len, reverse=True)
    device, head = next(model.parameters()).device, model.lm_head
    logp = lambda h: head(h.to(head.weight.dtype)).float().log_softmax(-1)  # noqa: E731
    out = [None] * len(pairs)
    for start in range(0, len(contexts), batch_size):
        ctxs = contexts[start:start + batch_size]
        T = max(len(c) for c in ctxs)
        ids = torch.full((len(ctxs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ctxs), T), dtype=torch.long)
        for r, c in enumerate(ctxs):
            ids[r, T - len(c):] = torch.tensor(c)
            mask[r, T - len(c):] = 1
        cache = MambaCache(len(model.backbone.layers))
        first = logp(model.backbone(ids.to(device), mask.to(device), cache)[:, -1])   # predicts cont[0]
        rows = [(r, i) for r, c in enumerate(ctxs) for i in groups[c]]
        conts = [pairs[i][1] for _, i in rows]
        parent = torch.tensor([r for r, _ in rows], device=device)
        # first continuation token: from the context's last position
        has = [j for j, k in enumerate(conts) if k]
        tok0 = torch.tensor([conts[j][0] for j in has], device=device, dtype=torch.long)
        lp0 = first[parent[has]] if has else first[:0]
        tok_lp = {j: [lp0[n].gather(0, tok0[n:n + 1])] for n, j in enumerate(has)}
        greedy = {j: [bool(lp0[n].argmax() == tok0[n])] for n, j in enumerate(has)}
        T2 = max((len(k) - 1 for k in conts), default=0)
        if T2 > 0:   # the rest: continuation token t predicts t + 1, from the context's state
            cache.reorder(parent)
            ids2 = torch.full((len(conts), T2), pad_id, dtype=torch.long)
            for j, k in enumerate(conts):
                ids2[j, :len(k) - 1] = torch.tensor(k[:-1], dtype=torch.long)
            h = model.backbone(ids2.to(device), None, cache)
            rix = torch.cat([torch.full((len(k) - 1,), j) for j, k in enumerate(conts) if len(k) > 1])
            tix = torch.cat([torch.arange(len(k) - 1) for k in conts if len(k) > 1])
            target = torch.cat([torch.tensor(k[1:]) for k in conts if len(k) > 1]).to(device)
            lp = logp(h[rix.to(device), tix.to(device)])
            tok, hit = lp.gather(1, target[:, None])[:, 0], lp.argmax(-1) == target
            at = 0
            for j, k in enumerate(conts):
                if len(k) > 1:
                    tok_lp[j].append(tok[at:at + len(k) - 1])
                    greedy[j].append(bool(hit[at:at + len(k) - 1].all()))
                    at += len(k) - 1
        for j, (_, i) in enumerate(rows):
            out[i] = (float(torch.cat(tok_lp[j]).sum()), all(greedy[j])) if j in tok_lp else (0.0, True)
    return out


def evaluate(model, tokenizer, tasks, batch_size=32, limit=None):
    """{task name: {metric: value, "n": documents}}, means over documents as the harness aggregates."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    results = {}
    for task in tasks:
        docs = documents(task, limit)
        flat = [encode_pair(tokenizer, c, k, prefix) for _, args in docs for c, k in args]
        scores = score(model, flat, batch_size, pad)
        per_metric, at = defaultdict(list), 0
        for doc, args in docs:
            for k, v in task.process_results(doc, scores[at:at + len(args)]).items():
                per_metric[k].append(v)
            at += len(args)
        agg = task.aggregation()
        results[task.config.task] = {**{k: float(agg[k](v)) for k, v in per_metric.items()}, "n": len(docs)}
    return results

