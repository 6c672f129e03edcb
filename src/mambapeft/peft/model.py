"""The peft-shaped wrapper: get_peft_model, trainable counts, adapter files, merge, param groups."""
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..io import CheckpointError, read_json, read_weights, write_json, write_safetensors
from .config import METHODS, PeftConfig
from .inject import backbone, inject, mixers, model_kind

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
NO_DECAY = ("A_log", "A_b_log", "cls_token", "pos_embed")  # besides every 1-D tensor


def base_config_dict(model):
    return {"kind": model_kind(model), **asdict(model.config)}


def get_peft_model(model, config):
    """Freeze `model`, attach the methods of `config` (a PeftConfig or its dict) and wrap it."""
    return PeftModel(model, config if isinstance(config, PeftConfig) else PeftConfig.from_dict(config))


class PeftModel(nn.Module):
    def __init__(self, model, config: PeftConfig):
        super().__init__()
        self.base_model, self.peft_config = model, config
        kind = model_kind(model)
        config.validate_for(kind)
        if kind == "lm" and "head" in config.methods and model.config.tie_word_embeddings:
            raise ValueError("method 'head' needs an untied LM head; this model ties lm_head to the embedding")
        model.requires_grad_(False)
        self.method_of = {}   # parameter -> method name, for counts and optimizer groups
        for name, modules in inject(model, config).items():
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(True)
                    self.method_of[p] = name
        if "full" in config.methods:
            for p in model.parameters():
                if p not in self.method_of:
                    p.requires_grad_(True)
                    self.method_of[p] = "full"
        if "head" in config.methods:
            head = model.head if kind == "vim" else model.lm_head
            for p in head.parameters():
                p.requires_grad_(True)
                self.method_of[p] = "head"
        self.train(model.training)  # new adapters follow the model's train/eval mode

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name):  # like peft: attributes of the base model show through
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

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
    def trainable_state_dict(self):
        return {n: p.detach() for n, p in self.base_model.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory):
        directory = Path(directory)
        write_safetensors(directory / ADAPTER_WEIGHTS, self.trainable_state_dict(),
                          metadata={"format": "pt", "mambapeft_version": __version__})
        write_json(directory / ADAPTER_CONFIG, {"peft_type": "MAMBAPEFT", "mambapeft_version": __version__,
                                               "base_model": base_config_dict(self.base_model),
                                               **self.peft_config.to_dict()})

    @classmethod
    def from_pretrained(cls, model, directory, is_trainable=False):
        """Attach the adapter saved in `directory` to `model`, which must match its base config."""
        directory = Path(directory)
        raw = read_json(directory / ADAPTER_CONFIG)
        config = PeftConfig.from_dict(raw, str(directory / ADAPTER_CONFIG))
        saved, ours = raw.get("base_model", {}), base_config_dict(model)
        diff = sorted(k for k in set(saved) | set(ours) if k != "extra" and saved.get(k) != ours.get(k))
        if diff:
            raise CheckpointError(f"{directory / ADAPTER_CONFIG}: the adapter was trained on another base model; "
                                  + "; ".join(f"{k}: adapter {saved.get(k)!r}, model {ours.get(k)!r}" for k in diff))
        peft = cls(model, config)
        weights_path = directory / ADAPTER_WEIGHTS
        state, own = read_weights(weights_path), peft.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{weights_path}: tensors do not match {ADAPTER_CONFIG}; missing: "
                                  f"{missing[:10]}, unexpected: {unexpected[:10]}, shapes: {shapes[:10]}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        if not is_trainable:
            model.requires_grad_(False)
        return peft

    # ---- merging --------------------------------------------------------------------------
    def unmergeable_methods(self):
        found = set()
        for m in mixers(self.base_model):
            found |= {_method(k) for k, a in m.peft.items() if not a.mergeable}
        found |= {k for k, a in backbone(self.base_model).peft.items() if not a.mergeable}
        return sorted(found)

    @torch.no_grad()
    def merge_and_unload(self, strict=True):
        """Fold LoRA, partial LoRA, DoRA and partial-tuning deltas into the base weights and return
        the base model. Prompt, affix, Additional-scan and the parallel adapter cannot be folded:
        with strict=True their presence is an error; with strict=False they stay attached."""
        left = self.unmergeable_methods()
        if left and strict:
            raise ValueError(f"cannot merge {', '.join(left)}: these methods change the sequence, the state "
                             "size or add a non-linear path. Use merge_and_unload(strict=False) to merge the "
                             "rest and keep them attached.")
        model = self.base_model
        for m in mixers(model):
            mergeable = [a for a in m.adapters() if a.mergeable]
            if mergeable:
                _write_back(m, m.compose(merge=True, adapters=mergeable))
            for key in [k for k, a in m.peft.items() if a.mergeable]:
                del m.peft[key]
        bb = backbone(model)
        for key in [k for k, a in bb.peft.items() if a.mergeable]:
            _merge_model_adapter(model, bb.peft[key])
            del bb.peft[key]
        return model

    @torch.no_grad()
    def collapse_projections(self):
        """Replace the reparameterisation of prompt and affix tokens by the tokens it produces."""
        for a in backbone(self.base_model).peft.values():
            if hasattr(a, "collapse"):
                a.collapse()
                for p in a.parameters():
                    p.requires_grad_(True)
                    self.method_of[p] = "prompt" if type(a).__name__ == "PromptTuning" else "affix"
        alive = {p for p in self.base_model.parameters()}
        self.method_of = {p: n for p, n in self.method_of.items() if p in alive}


def _method(key):
    return key[:-2] if key.endswith("_b") and key[:-2] in METHODS else key


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


def _merge_model_adapter(model, a):
    from .lora import PatchEmbeddingLoRA, TokenEmbeddingLoRA
    from .partial import ParamDelta
    if isinstance(a, TokenEmbeddingLoRA):
        if model.config.tie_word_embeddings:  # the LoRA changes inputs only: the head keeps the old weight
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(),
                                                requires_grad=model.lm_head.weight.requires_grad)
            model.config.tie_word_embeddings = False
        w = model.backbone.embeddings.weight
        w.copy_(a.merged_weight(w))
    elif isinstance(a, PatchEmbeddingLoRA):
        w = model.patch_embed.proj.weight
        w.copy_(a.merged_weight(w))
    elif isinstance(a, ParamDelta):
        getattr(model, a.name).add_(a.delta.to(getattr(model, a.name).dtype))
    else:
        raise AssertionError(f"no merge rule for {type(a).__name__}")
