"""The fine-tuning loop: any PeftModel, on the batches a task supplies (training/task.py).

The engine owns the sample order: epoch e visits the training set in a permutation seeded by
(seed, e); optimizer step s takes the next `batch_size` items of it, process r of W takes every
W-th of those, and splits its share into micro-batches. The gradient is the sum of the per-unit
loss gradients divided by the step's global unit count, so the update does not depend on the
number of processes or the micro-batch size (up to float summation order), and step s sees the
same items in a resumed run as in an uninterrupted one."""
import contextlib
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..io import CheckpointError, read_json, read_weights, write_json
from ..models.mixer import set_recompute_z
from ..peft import PeftConfig, get_peft_model, preset
from ..peft.config import ConfigError
from ..peft.inject import model_kind
from . import checkpoint, distributed, graphs, logs
from .config import apply_overrides, dump_config, load_config, validate
from .schedule import lr_factor
from .task import build_task

CONFIG = "config.yaml"
BASE = "base_metrics.json"   # the base model's metrics (training.eval_base), kept for a resumed run
# Settings a resumed run may change: they do not alter the result.
RESUMABLE = {"progress", "num_workers", "log_every", "device", "keep_checkpoints", "frozen_dtype", "recompute_z"}


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says why and what was kept."""


def train(config, task=None, model=None, callback=None, resume=False, overrides=()):
    """Fine-tune as `config` says and return the final metrics.

    config: a YAML path or a config dict (training/config.py); `overrides`: "key=value" strings.
    task: a Task to use instead of building one from config["task"].
    model: an already loaded base model (not wrapped) instead of task.load_model(config["model"]);
        the methods are attached to it in place, and its frozen mixer weights may be stored in bf16
        (training.frozen_dtype) and its norms set to a bf16 output (training.memory_efficient_norm),
        so pass a fresh copy for each run.
    callback(step, metrics): called on rank 0 after each validation; returning True stops the run
        after a checkpoint (an exception, e.g. optuna.TrialPruned, propagates).
    resume: continue the run in config's output_dir from its newest checkpoint."""
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    else:
        config = validate(apply_overrides(config, overrides), "config")
    t = config["training"]
    ctx = distributed.setup(t["device"])
    frozen = _frozen_dtype(t, ctx.device)
    lean_norm = _norm_dtype(t, ctx.device)
    if t["cuda_graph"] and ctx.device.type != "cuda":
        raise ConfigError(f"training.cuda_graph: needs a CUDA device, got {ctx.device.type}")
    run_dir = Path(config["output_dir"])
    _check_run_dir(run_dir, config, resume)

    _seed_all(t["seed"])
    task = task if task is not None else build_task(config["task"], "task")
    if model is None:
        model = task.load_model(config["model"])
    model.to(ctx.device)   # adapters are created on the base model's device
    # again after loading, which may draw random numbers (a new head): the same adapter
    # initialisation on every process, and whether the base model was passed in or loaded here
    _seed_all(t["seed"])
    try:
        peft = get_peft_model(model, _peft_config(config["methods"], model)).to(ctx.device)
    except ValueError as e:   # a method that cannot apply to this model (ConfigError is one too)
        raise e if isinstance(e, ConfigError) else ConfigError(f"methods: {e}") from None
    peft.train()
    if frozen is not None:   # frozen tensors only: the optimizer never sees them
        peft.cast_frozen(frozen)
    peft.memory_efficient_norm(lean_norm)   # None (the default) also undoes an earlier run's on a reused model
    set_recompute_z(peft.base_model, t["recompute_z"])
    groups = peft.param_groups(lr=t["lr"], weight_decay=t["weight_decay"])
    for g in groups:
        g["base_lr"] = g["lr"]
    params = [p for g in groups for p in g["params"]]
    distributed.broadcast_params(ctx, params)
    grad_sync = distributed.GradSync(ctx, params, overlap=not t["cuda_graph"])
    optimizer = torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["betas"]), eps=t["eps"],
                                  fused=ctx.device.type == "cuda")   # one kernel per group, not one per tensor
    if ctx.rank > 0:
        _seed_all(t["seed"] * 1000 + ctx.rank)   # dropout differs between processes

    order = Order(len(task.train_set()), t, ctx)
    total = t["max_steps"] or max(1, math.ceil(t["epochs"] * order.steps_per_epoch))
    warmup = t["warmup_steps"] or int(t["warmup_ratio"] * total)
    eval_every = order.steps_per_epoch if t["eval_every"] is None else t["eval_every"]
    save_every = t["save_every"] or eval_every or total   # eval_every 0: a checkpoint at the end only

    _start_run_dir(ctx, run_dir, config, resume)

    state = {"step": 0, "best": None, "best_step": None, "last_validation": None}
    if resume and (last := checkpoint.latest(run_dir)) is not None:
        state = checkpoint.load(last, peft, optimizer, ctx.rank)
    if ctx.main:
        checkpoint.clean_partial(run_dir)
    start = state["step"]

    log = logs.RunLog(run_dir, start, enabled=ctx.main)
    autocast = _autocast(ctx.device, t["precision"])
    graphed = None
    if t["cuda_graph"]:
        graphed = graphs.GraphedLoss(task, peft, params, getattr(autocast, "fast_dtype", None))
        graphed.zero_grad()
    base = _base_metrics(ctx, run_dir, peft, task, autocast, log, start) if t["eval_base"] else None
    bar = logs.progress(total, start, ctx.main and t["progress"])
    # its own generator: creating the iterator would otherwise draw from the global RNG just restored
    loader = iter(torch.utils.data.DataLoader(task.train_set(), batch_sampler=order.micro_batches(start, total),
                                              collate_fn=task.collate, num_workers=t["num_workers"],
                                              pin_memory=ctx.device.type == "cuda",   # a truly asynchronous copy
                                              generator=torch.Generator().manual_seed(t["seed"] + start)))
    has_validation = True
    try:
        step, t_prev = start, time.perf_counter()
        stop = False
        while step < total and not stop:
            factor = lr_factor(step, total, warmup, t["schedule"], t["min_lr_ratio"])
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            loss_sum, count = torch.zeros((), device=ctx.device), 0
            micro = order.micro_count(step)
            for i in range(micro):
                batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(loader).items()}
                if i == micro - 1:
                    grad_sync.arm()
                if graphed is not None:
                    s, c = graphed(batch)
                else:
                    with autocast:
                        s, c = task.loss(peft, batch)
                    s.backward()   # the sum; divided by the global count once all are in
                loss_sum += s.detach().float()
                count += c
            stats = grad_sync.finish(loss_sum, count)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])   # finite iff every gradient is
            # the step's one host synchronisation: each more one leaves the GPU idle while Python catches up
            total_loss, units, grad_norm = torch.cat([stats, norm.double().reshape(1)]).tolist()
            loss = total_loss / max(units, 1.0)
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                last = checkpoint.latest(run_dir)
                raise TrainingError(
                    f"step {step + 1}: non-finite loss ({loss}); non-finite gradients in "
                    f"{', '.join(_non_finite_groups(groups)) or 'no method group'}. Stopped; the last good "
                    f"checkpoint is {last if last else 'none (no checkpoint was written yet)'}")
            if t["grad_clip"] > 0:
                torch.nn.utils.clip_grads_with_norm_(params, t["grad_clip"], norm)
            optimizer.step()
            if graphed is not None:
                graphed.zero_grad()
            else:
                optimizer.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            record = {"step": step, "epoch": step / order.steps_per_epoch, "loss": loss, "lr": t["lr"] * factor,
                      "units": units, f"{task.unit}_per_s": units / (now - t_prev), "step_s": now - t_prev,
                      "grad_norm": float(grad_norm), "time": time.time()}
            log.write(record)
            bar.update(1)
            if step % t["log_every"] == 0 or step == total:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{t['lr'] * factor:.2e}",
                                **{f"{task.unit}/s": f"{record[f'{task.unit}_per_s']:.0f}"})
            evaluate_now = has_validation and (step == total or (eval_every and step % eval_every == 0))
            if evaluate_now:
                metrics = _evaluate(ctx, peft, task, "validation", autocast)
                if metrics is None:
                    has_validation = False
                else:
                    log.write({"step": step, "split": "validation", **metrics})
                    state["last_validation"] = metrics
                    score = metrics[task.metric]
                    better = state["best"] is None or \
                        (score > state["best"] if task.greater_is_better else score < state["best"])
                    if better:
                        state["best"], state["best_step"] = score, step
                        if ctx.main:
                            _save_adapter(peft, run_dir / "best", {"step": step, "validation": metrics})
                    if callback is not None and ctx.main:
                        stop = bool(callback(step, metrics))
                    stop = distributed.broadcast(ctx, stop)
            if step == total or stop or step % save_every == 0:
                state["step"] = step
                _save_checkpoint(ctx, run_dir, peft, optimizer, order, state, t["keep_checkpoints"])
            t_prev = time.perf_counter()   # evaluation and saving do not count against throughput
        if graphed is not None:
            graphs.log.info("training.cuda_graph: %s", graphed.stats())
        result = _finish(ctx, run_dir, peft, task, state, has_validation, autocast, base)
    finally:
        grad_sync.close()
        bar.close()
        log.close()
    if ctx.main:
        logs.plot(run_dir)
    distributed.barrier(ctx)
    return result


class Order:
    """Which items each process sees at each optimizer step (see the module docstring)."""

    def __init__(self, n, t, ctx):
        self.n, self.batch, self.seed, self.rank, self.world = n, t["batch_size"], t["seed"], ctx.rank, ctx.world
        self.micro = t["micro_batch_size"] or self.batch
        self.steps_per_epoch = n // self.batch   # the last partial batch of an epoch is dropped
        if self.steps_per_epoch == 0:
            raise ConfigError(f"training.batch_size: {self.batch} is more than the {n} training items")
        if self.batch < self.world:
            raise ConfigError(f"training.batch_size: {self.batch} is fewer than the {self.world} processes")
        self._perm = (None, None)

    def permutation(self, epoch):
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def share(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[k * self.batch:(k + 1) * self.batch][self.rank::self.world]

    def micro_count(self, step):
        return math.ceil(len(self.share(step)) / self.micro)

    def micro_batches(self, start, total):
        for step in range(start, total):
            mine = self.share(step)
            for i in range(0, len(mine), self.micro):
                yield mine[i:i + self.micro]


def _peft_config(methods, model):
    if isinstance(methods, str):
        return preset(methods, model=model_kind(model))
    return PeftConfig.from_dict({"methods": methods}, "methods")


def _check_run_dir(run_dir, config, resume):
    """Every process checks, so all raise the same error before anything is written."""
    saved = run_dir / CONFIG
    if resume:
        if not saved.is_file():
            raise ConfigError(f"{run_dir}: --resume, but this output_dir holds no run ({CONFIG} missing)")
        import yaml
        diff = _first_difference(yaml.safe_load(saved.read_text()), config)
        if diff:
            raise ConfigError(f"{saved}: {diff}: differs from the run being resumed; resume with the same "
                              "config or choose a new output_dir")
    else:
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"output_dir: {run_dir} is a file, expected a directory")
        if run_dir.is_dir() and any(run_dir.iterdir()):
            what = "another run" if saved.exists() else "other files"
            raise ConfigError(f"output_dir: {run_dir} holds {what}; pass --resume to continue it or "
                              "choose a new output_dir")


def _start_run_dir(ctx, run_dir, config, resume):
    """rank 0 writes config.yaml (once the task, model, methods and batch sizes were accepted)."""
    distributed.barrier(ctx)   # every process has checked the directory before it changes
    if ctx.main and not resume:
        from ..io import atomic_path
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / CONFIG) as tmp:
            tmp.write_text(dump_config(config))
    distributed.barrier(ctx)


def _first_difference(old, new, prefix=""):
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        if key.startswith("training.") and k in RESUMABLE:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            d = _first_difference(a, b, key + ".")
            if d:
                return d
        elif a != b:
            return key
    return None


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _bf16_autocast(precision, device):
    """Whether training.precision runs the step under bf16 autocast on this device."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(device, precision):
    if not _bf16_autocast(precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _frozen_dtype(t, device):
    """bf16 when the frozen matmul weights are to be stored in bf16 (peft/frozen.py), else None."""
    bf16_autocast = _bf16_autocast(t["precision"], device)
    if t["frozen_dtype"] == "bf16" and not bf16_autocast:
        raise ConfigError(f"training.frozen_dtype: bf16 needs bf16 autocast, and precision {t['precision']} on "
                          f"{device.type} runs in fp32; expected auto or fp32")
    return torch.bfloat16 if t["frozen_dtype"] == "bf16" or (t["frozen_dtype"] == "auto" and bf16_autocast) \
        else None


def _norm_dtype(t, device):
    """The dtype the norms hand their output on in (training.memory_efficient_norm), else None."""
    if not t["memory_efficient_norm"]:
        return None
    if not _bf16_autocast(t["precision"], device):
        raise ConfigError(f"training.memory_efficient_norm: needs bf16 autocast, and precision {t['precision']} "
                          f"on {device.type} runs in fp32; expected false")
    return torch.bfloat16


def _non_finite_groups(groups):
    bad = []
    for g in groups:
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in g["params"]):
            if g["method"] not in bad:
                bad.append(g["method"])
    return bad


def _evaluate(ctx, peft, task, split, autocast):
    """rank 0 evaluates, every process gets the metrics; None when the task has no such split."""
    metrics = None
    if ctx.main:
        peft.eval()
        try:
            with torch.no_grad(), autocast:
                metrics = {k: float(v) for k, v in task.evaluate(peft, split).items()}
        except KeyError as e:   # the task has no such split; any other KeyError is a bug to show
            if not e.args or e.args[0] != split:
                raise
        finally:
            peft.train()
    return distributed.broadcast(ctx, metrics)


def _save_adapter(peft, directory, metrics):
    peft.save_pretrained(directory)
    write_json(directory / "metrics.json", metrics)


def _save_checkpoint(ctx, run_dir, peft, optimizer, order, state, keep):
    epoch, k = divmod(state["step"], order.steps_per_epoch)
    state = {**state, "epoch": epoch, "items_into_epoch": k * order.batch, "world_size": ctx.world}
    rng = distributed.gather_rng(ctx, checkpoint.rng_state())
    if ctx.main:
        checkpoint.save(run_dir, peft, optimizer, state, rng, keep)
    distributed.barrier(ctx)


def _base_metrics(ctx, run_dir, peft, task, autocast, log, start):
    """The base model's validation and test metrics before the first step: with the adapters disabled,
    or, for methods that change base weights in place (full, head), as initialised: before any update.
    A resumed run reads what its first start measured (None if that run did not)."""
    path = run_dir / BASE
    if start > 0 or path.is_file():   # resumed (the file is there even when killed before step 1's checkpoint)
        base = read_json(path) if ctx.main and path.is_file() else None
        return distributed.broadcast(ctx, base)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(peft.disable_adapters())
            how = "adapters disabled"
        except ValueError:   # methods training base weights in place cannot be switched off
            how = "before any update"
        base = {"validation": _evaluate(ctx, peft, task, "validation", autocast),
                "test": _evaluate(ctx, peft, task, "test", autocast), "how": how}
    if ctx.main:
        for split in ("validation", "test"):
            if base[split] is not None:
                log.write({"step": 0, "split": f"base_{split}", **base[split]})
        write_json(path, base)
    return base


def _finish(ctx, run_dir, peft, task, state, has_validation, autocast, base=None):
    """last/ adapter; the best adapter's test metrics; metrics.json. Returns the metrics."""
    if ctx.main:
        _save_adapter(peft, run_dir / "last", {"step": state["step"], "validation": state["last_validation"]})
    if has_validation and state["best_step"] is not None:
        if ctx.main:   # only rank 0 evaluates; the files may be on its machine alone
            _load_adapter(peft, run_dir / "best")
    else:
        state["best_step"] = state["step"]
    test = _evaluate(ctx, peft, task, "test", autocast)
    trainable, total = peft.num_parameters()
    result = {"steps": state["step"], "best_step": state["best_step"], "metric": task.metric,
              "best": state["best"], "validation": state["last_validation"], "test": test,
              "trainable_params": trainable, "total_params": total}
    if base is not None:
        result["base"] = base
    if ctx.main:
        if has_validation and state["best_step"] is not None:
            result["best_validation"] = read_json(run_dir / "best" / "metrics.json")["validation"]
        write_json(run_dir / "metrics.json", result)
    return result


def _load_adapter(peft, directory):
    weights = read_weights(directory / "adapter_model.safetensors")
    own = dict(peft.base_model.named_parameters())
    if set(weights) != set(peft.trainable_state_dict()):
        raise CheckpointError(f"{directory}: the adapter does not match this run's methods")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)
