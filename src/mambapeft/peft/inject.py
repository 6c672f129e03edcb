"""Attach the configured methods to a model: each method's registered attach() says where."""
import torch

from .config import METHODS, PeftConfig
from .registry import Site


def model_kind(model):
    return "vim" if hasattr(model, "patch_embed") else "lm"


def backbone(model):
    return model if model_kind(model) == "vim" else model.backbone


def mixers(model):
    return [layer.mixer for layer in backbone(model).layers]


def adapter_dtype(like):
    """Adapters keep fp32 on a half-precision base (as peft's autocast_adapter_dtype) and cast at use."""
    return torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype


def place(module, like):
    """Put a new adapter on the device of the base tensor it attaches to, in adapter_dtype(like)."""
    return module.to(device=like.device, dtype=adapter_dtype(like))


def inject(model, config: PeftConfig, suffix="", adapter_name="default"):
    """Add every configured adapter to `model` in place, each under its key + `suffix` and stamped
    with its method and adapter name; returns {method: [adapter modules]}."""
    kind = model_kind(model)
    config.validate_for(kind)
    added = {}
    for name in sorted(config.methods, key=list(METHODS).index):  # one canonical order, whatever the config's
        def put(where, key, module, like, method=name):
            key += suffix
            if key in where:
                raise ValueError(f"the model already carries an adapter {key!r} (attached by another PeftModel?); "
                                 "add a second adapter with load_adapter(directory, name), or unload() the first")
            module.method, module.adapter_name = method, adapter_name
            where[key] = place(module, like)
            added.setdefault(method, []).append(module)

        attach = METHODS[name].attach
        if attach is not None:
            attach(Site(model, kind, backbone(model), put), name, config.methods[name])
    return added
