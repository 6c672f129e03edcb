"""The peft-shaped wrapper: get_peft_model, trainable counts, adapter files, merge, param groups."""
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..io import CheckpointError, read_json, read_weights, write_json, write_safetensors
from ..models.adapter import peft_dicts
from ..models.norm import memory_efficient_norm
from .config import METHODS, PeftConfig
from .frozen import cast_frozen
from .inject import backbone, inject, mixers, model_kind

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
NO_DECAY = ("A_log", "A_b_log", "cls_token", "pos_embed")  # besides every 1-D tensor


def base_config_dict(model):
    return {"kind": model_kind(model), **asdict(model.config)}


def get_peft_model(model, config):
    """Freeze `model`, attach the methods of `config` (a PeftConfig or its dict) and wrap it."""
    return PeftModel(model, config if isinstance(config, PeftConfig) else PeftConfig.from_dict(config))


class _Undo:
    """What attaching adapters changes on a base model (new `peft` entries, requires_grad flags,
    train/eval mode), recorded before, so a failed attach or unload() can give the model back."""

    def __init__(self, model):
        self.model, self.training = model, model.training
        self.grad = [(p, p.requires_grad) for p in model.parameters()]
        self.keys = [(d, set(d)) for d in peft_dicts(model)]

    def __call__(self):
        for d, keys in self.keys:
            for k in [k for k in d if k not in keys]:
                del d[k]
        for p, flag in self.grad:
            p.requires_grad_(flag)
        self.model.train(self.training)


class PeftModel(nn.Module):
    def __init__(self, model, config: PeftConfig, adapter_name="default", is_trainable=True):
        super().__init__()
        self.base_model = model
        self.peft_configs, self.active_adapter = {}, adapter_name
        self._method_of, self._suffix, self._undo = {}, {}, {}   # per adapter name
        self._attach(config, adapter_name, is_trainable)

    # The active adapter's config and {parameter: method}, as before there could be several.
    @property
    def peft_config(self):
        return self.peft_configs[self.active_adapter]

    @property
    def method_of(self):
        return self._method_of[self.active_adapter]

    def _attach(self, config, name, trainable):
        """Attach `config` as adapter `name`; on any failure the model is left exactly as it was."""
        model = self.base_model
        config.validate_for(model_kind(model))
        if not isinstance(name, str) or not name.isidentifier() or "__" in name:
            raise ValueError(f"adapter name {name!r}: expected a Python identifier without '__'")
        if name in self.peft_configs:
            raise ValueError(f"an adapter named {name!r} is already loaded; loaded: {', '.join(self.peft_configs)}")
        in_place = {n for n in METHODS if METHODS[n].base_params is not None}   # full, head
        if self.peft_configs and (in_place & set(config.methods) or
                                  any(in_place & set(c.methods) for c in self.peft_configs.values())):
            raise ValueError(f"methods {', '.join(sorted(in_place))} train base weights in place: such an adapter "
                             "cannot share its base model with another adapter")
        undo = _Undo(model)
        try:
            first = not self.peft_configs
            suffix = "" if first else f"__{name}"
            if first:
                model.requires_grad_(False)
            method_of = {}
            for method, modules in inject(model, config, suffix, name).items():
                for module in modules:
                    for p in module.parameters():
                        p.requires_grad_(trainable)
                        method_of[p] = method
            for method in sorted(in_place & set(config.methods), key=list(METHODS).index):
                for p in METHODS[method].base_params(model):   # not adapters' tensors; head claims from full
                    if p not in method_of or method_of[p] in in_place:
                        p.requires_grad_(trainable)
                        method_of[p] = method
        except BaseException:
            undo()
            raise
        self.peft_configs[name], self._method_of[name], self._suffix[name], self._undo[name] = \
            config, method_of, suffix, undo
        self.set_adapter(self.active_adapter)
        self.train(model.training)  # new adapters follow the model's train/eval mode

    def _detach(self, name):
        self._undo.pop(name)()
        for d in (self.peft_configs, self._method_of, self._suffix):
            d.pop(name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name):  # like peft: attributes of the base model show through
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # ---- several adapters on one base ------------------------------------------------------
    def set_adapter(self, name):
        """Make adapter `name` the one the forward uses (the others stay loaded, unused)."""
        if name not in self.peft_configs:
            raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(self.peft_configs)}")
        self.active_adapter = name
        for d in peft_dicts(self.base_model):
            for a in d.values():
                a.active = getattr(a, "adapter_name", name) == name

    def load_adapter(self, directory, adapter_name, is_trainable=False):
        """Load a saved adapter beside the loaded ones (on the same base) as `adapter_name`; it is
        used once set_adapter(adapter_name) selects it."""
        config, state = read_adapter(self.base_model, directory)
        self._attach(config, adapter_name, is_trainable)
        try:
            self._load_state(adapter_name, state, Path(directory) / ADAPTER_WEIGHTS)
        except BaseException:
            self._detach(adapter_name)
            raise
        return self

    @contextmanager
    def disable_adapters(self):
        """`with peft.disable_adapters():` the base model's outputs, adapters kept for afterwards."""
        in_place = sorted(n for n in self.peft_config.methods if METHODS[n].base_params is not None)
        if in_place:
            raise ValueError(f"method(s) {', '.join(in_place)} train base weights in place; they cannot be disabled")
        dicts = peft_dicts(self.base_model)
        flags = [(a, a.active) for d in dicts for a in d.values()]
        try:
            for a, _ in flags:
                a.active = False
            yield self
        finally:
            for a, flag in flags:
                a.active = flag

    disable_adapter = disable_adapters   # Hugging Face peft's name

    def unload(self):
        """Remove every adapter and give back the base model with its weights and requires_grad
        flags untouched (methods 'full' and 'head' trained base weights in place: those stay)."""
        for name in list(self._undo)[::-1]:
            self._detach(name)
        return self.base_model

    def cast_frozen(self, dtype):
        """Store the frozen mixer weights that only matrix products read in `dtype` (peft/frozen.py):
        the same results under autocast to `dtype`, without its per-step casts and their saved copies.
        Call it once every adapter is attached (an adapter attached later that adds to such a weight
        would add to the rounded one). Returns the number of elements converted."""
        return cast_frozen(self.base_model, dtype)

    def memory_efficient_norm(self, dtype):
        """Every RMSNorm hands its output on in `dtype` (the autocast dtype, e.g. torch.bfloat16) and
        keeps only that output for its backward, not the fp32 residual (models/norm.py): the same
        forward under autocast to `dtype`, gradients within its rounding. None restores the default.
        Returns the number of norms set."""
        return memory_efficient_norm(self.base_model, dtype)

    # ---- counting -------------------------------------------------------------------------
    def trainable_parameters_by_method(self):
        counts = {}
        for p, name in self.method_of.items():
            counts[name] = counts.get(name, 0) + p.numel()
        return counts

    def num_parameters(self):
        unique = {id(p): p for p in self.base_model.parameters()}
        trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
        return trainable, sum(p.numel() for p in unique.values())

    def print_trainable_parameters(self):
        trainable, total = self.num_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ---- optimizer ------------------------------------------------------------------------
    def param_groups(self, lr, weight_decay=0.0):
        """AdamW groups: per method lr*lr_mult and weight_decay*wd_mult; Additional-scan's A_log,
        and norms, biases, A_log, D, CLS and position tensors under full fine-tuning, get none."""
        names = {p: n for n, p in self.base_model.named_parameters()}
        groups = {}
        for p, method in self.method_of.items():
            s = self.peft_config.methods[method]
            n = names[p]
            no_decay = (method == "additional_scan" and n.endswith(".A_log")) or \
                (method == "full" and (p.ndim < 2 or n.rsplit(".", 1)[-1] in NO_DECAY))
            key = (method, no_decay)
            if key not in groups:
                groups[key] = {"params": [], "lr": lr * s.lr_mult, "method": method,
                               "weight_decay": 0.0 if no_decay else weight_decay * s.wd_mult}
            groups[key]["params"].append(p)
        return list(groups.values())

    # ---- files ----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name=None):
        """Every tensor of the adapter (by membership, trainable or not) under the names it has
        when it is the only adapter: the names of its file."""
        name = adapter_name or self.active_adapter
        members, suffix = self._method_of[name], self._suffix[name]
        return {_unsuffix(n, suffix): p.detach() for n, p in self.base_model.named_parameters() if p in members}

    trainable_state_dict = adapter_state_dict   # the former name, kept for callers

    def save_pretrained(self, directory, adapter_name=None):
        """adapter_config.json + adapter_model.safetensors, written as a pair: both carry one random
        `pair` id, so weights beside a config of another save (an interrupted save) are refused."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"{directory}: expected a directory to save the adapter in, got a file")
        name = adapter_name or self.active_adapter
        pair = uuid.uuid4().hex
        for stale in directory.glob(".adapter_*") if directory.is_dir() else ():  # left by a killed save
            stale.unlink(missing_ok=True)
        write_safetensors(directory / ADAPTER_WEIGHTS, self.adapter_state_dict(name),
                          metadata={"format": "pt", "mambapeft_version": __version__, "pair": pair})
        write_json(directory / ADAPTER_CONFIG, {"peft_type": "MAMBAPEFT", "mambapeft_version": __version__,
                                               "base_model": base_config_dict(self.base_model), "pair": pair,
                                               **self.peft_configs[name].to_dict()})

    @classmethod
    def from_pretrained(cls, model, directory, is_trainable=False, adapter_name="default"):
        """Attach the adapter saved in `directory` to `model`, which must match its base config.
        Not trainable (the default): its tensors are frozen and the model is put in eval mode.
        On any failure the model is left as it was."""
        config, state = read_adapter(model, directory)
        peft = cls(model, config, adapter_name, is_trainable)
        try:
            peft._load_state(adapter_name, state, Path(directory) / ADAPTER_WEIGHTS)
        except BaseException:
            peft._detach(adapter_name)
            raise
        if not is_trainable:
            peft.eval()
        return peft

    def _load_state(self, name, state, source):
        own = self.adapter_state_dict(name)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{source}: tensors do not match {ADAPTER_CONFIG}; missing: "
                                  f"{missing[:10]}, unexpected: {unexpected[:10]}, shapes: {shapes[:10]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    # ---- merging --------------------------------------------------------------------------
    def _attached(self):
        """The active adapter's modules, with the dict that holds each: [(peft dict, key, module)]."""
        return [(d, k, a) for d in peft_dicts(self.base_model) for k, a in d.items()
                if getattr(a, "adapter_name", self.active_adapter) == self.active_adapter]

    def unmergeable_methods(self):
        return sorted({a.method for _, _, a in self._attached() if not a.mergeable})

    @torch.no_grad()
    def merge_and_unload(self, strict=True):
        """Fold the active adapter's LoRA, partial LoRA, DoRA and partial-tuning deltas into the base
        weights and return the base model (other loaded adapters are removed). Prompt, affix,
        Additional-scan and the parallel adapter cannot be folded: with strict=True their presence is
        an error; with strict=False they stay attached (and the model's save_pretrained refuses).
        After cast_frozen(bf16) a weight that was cast, and the delta folded into it, ends in bf16."""
        left = self.unmergeable_methods()
        if left and strict:
            raise ValueError(f"cannot merge {', '.join(left)}: these methods change the sequence, the state "
                             "size or add a non-linear path. Use merge_and_unload(strict=False) to merge the "
                             "rest and keep them attached.")
        for name in [n for n in self.peft_configs if n != self.active_adapter][::-1]:
            self._detach(name)
        model = self.base_model
        for m in mixers(model):
            mergeable = [a for a in m.adapters() if a.mergeable]
            if mergeable:
                _write_back(m, m.compose(merge=True, adapters=mergeable))
        for d, key, a in self._attached():
            if a.mergeable:
                if a in backbone(model).peft.values():
                    a.merge_into(model)
                del d[key]
        return model

    @torch.no_grad()
    def collapse_projections(self):
        """Replace the reparameterisation of prompt and affix tokens by the tokens it produces."""
        method_of = self.method_of
        for _, _, a in self._attached():
            if hasattr(a, "collapse"):
                a.collapse()
                for p in a.parameters():
                    p.requires_grad_(True)
                    method_of[p] = a.method
        alive = set(self.base_model.parameters())
        for p in [p for p in method_of if p not in alive]:
            del method_of[p]


def read_adapter(model, directory):
    """(PeftConfig, tensors) of a saved adapter, checked against `model` before anything is attached."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: expected an adapter directory (with {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS})")
    raw = read_json(directory / ADAPTER_CONFIG)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: expected a JSON object")
    config = PeftConfig.from_dict(raw, str(directory / ADAPTER_CONFIG))
    saved, ours = raw.get("base_model", {}), base_config_dict(model)
    diff = sorted(k for k in set(saved) | set(ours) if k != "extra" and saved.get(k) != ours.get(k))
    if diff:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: the adapter was trained on another base model; "
                              + "; ".join(f"{k}: adapter {saved.get(k)!r}, model {ours.get(k)!r}" for k in diff))
    weights = directory / ADAPTER_WEIGHTS
    state = read_weights(weights)
    pair = safe_open_metadata(weights).get("pair")
    if raw.get("pair") != pair:
        raise CheckpointError(f"{weights}: written by another save than {ADAPTER_CONFIG} (an interrupted "
                              "save?); save the adapter again")
    return config, state


def safe_open_metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _unsuffix(name, suffix):
    return name if not suffix else ".".join(p[:-len(suffix)] if p.endswith(suffix) else p for p in name.split("."))


def _write_back(m, c):
    m.in_proj.weight.copy_(c.in_proj)
    m.out_proj.weight.copy_(c.out_proj)
    for s, sfx in zip(c.dirs, m.directions):
        conv, dt = getattr(m, "conv1d" + sfx), getattr(m, "dt_proj" + sfx)
        conv.weight.copy_(s.conv_w[:, None])
        getattr(m, "x_proj" + sfx).weight.copy_(s.x_proj)
        dt.weight.copy_(s.dt_w)
        dt.bias.copy_(s.dt_b)
        getattr(m, m.a_name(sfx)).copy_(s.A_log)
        getattr(m, "D" + sfx).copy_(s.D)
