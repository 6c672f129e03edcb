"""Attach the configured methods to a model: which adapter goes where."""
import torch

from ..models.mixer import MixerAdapter
from .additional_scan import AdditionalScan
from .affix import AffixLayer, AffixTokens
from .config import METHODS, PeftConfig
from .lora import MixerLoRA, PatchEmbeddingLoRA, TokenEmbeddingLoRA
from .parallel_adapter import ParallelAdapter
from .partial import MIXER_TARGETS, MixerDelta, ParamDelta
from .prompt import PromptTuning


def model_kind(model):
    return "vim" if hasattr(model, "patch_embed") else "lm"


def backbone(model):
    return model if model_kind(model) == "vim" else model.backbone


def mixers(model):
    return [layer.mixer for layer in backbone(model).layers]


def _lora_rows(name, m):
    E, R, N = m.d_inner, m.dt_rank, m.d_state
    return {"lora_in_proj": ("in_proj", None, True), "lora_out_proj": ("out_proj", None, True),
            "lora_x_proj": ("x_proj", None, False), "lora_dt": ("dt_proj", None, False),
            "lora_X": ("in_proj", (0, E), True), "lora_Z": ("in_proj", (E, 2 * E), True),
            "lora_d": ("x_proj", (0, R), False), "lora_B": ("x_proj", (R, R + N), False),
            "lora_C": ("x_proj", (R + N, R + 2 * N), False)}[name]


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
    bb = backbone(model)
    m0 = bb.layers[0].mixer
    added = {}

    def put(where, key, module, method, like):
        key += suffix
        if key in where:
            raise ValueError(f"the model already carries an adapter {key!r} (attached by another PeftModel?); "
                             "add a second adapter with load_adapter(directory, name), or unload() the first")
        module.method, module.adapter_name = method, adapter_name
        where[key] = place(module, like)
        added.setdefault(method, []).append(module)

    for name in sorted(config.methods, key=list(METHODS).index):  # one canonical order, whatever the config's
        s = config.methods[name]
        if name in ("full", "head"):
            continue
        if name == "lora_embed":
            emb = TokenEmbeddingLoRA(bb.embeddings, s.r, s.scale, s.dora) if kind == "lm" else \
                PatchEmbeddingLoRA(model.patch_embed.proj, s.r, s.scale, s.dora)
            put(bb.peft, name, emb, name, bb.embeddings.weight if kind == "lm" else model.patch_embed.proj.weight)
        elif name in ("cls", "pos"):
            pname = {"cls": "cls_token", "pos": "pos_embed"}[name]
            put(bb.peft, name, ParamDelta(pname, getattr(model, pname)), name, getattr(model, pname))
        elif name == "prompt":
            put(bb.peft, name, PromptTuning(m0.d_model, s.tokens, s.projection, s.hidden), name,
                m0.in_proj.weight)
        elif name == "affix":
            width = m0.d_model if s.position == "outer" else m0.d_inner * (2 if s.store_z else 1)
            per_layer = 2 if kind == "vim" and s.dual and s.position != "outer" else 1
            tokens = AffixTokens(s.tokens, len(bb.layers), per_layer, width, s.projection, s.hidden)
            put(bb.peft, name, tokens, name, m0.in_proj.weight)
            for i, m in enumerate(mixers(model)):
                put(m.peft, name, AffixLayer(tokens, i, s.position, per_layer == 2, s.store_z), name, m.in_proj.weight)
        else:
            for m in mixers(model):
                for key, adapter in _mixer_adapters(name, s, m).items():
                    put(m.peft, key, adapter, name, m.in_proj.weight)
    return added


def _mixer_adapters(name, s, m) -> dict[str, MixerAdapter]:
    if name.startswith("lora_"):
        target, rows, activation = _lora_rows(name, m)
        if target in ("in_proj", "out_proj"):
            return {name: MixerLoRA(m, target, rows, s.r, s.scale, s.dropout, s.dora, 0, activation)}
        return {name + sfx: MixerLoRA(m, target, rows, s.r, s.scale, s.dropout, s.dora, d, activation)
                for sfx, d in zip(m.directions, range(2))}
    if name in MIXER_TARGETS:
        return {name + sfx: MixerDelta(m, name, d) for d, sfx in enumerate(m.directions)}
    if name == "additional_scan":
        return {name + sfx: AdditionalScan(m, s.states, s.init, s.position, d) for d, sfx in enumerate(m.directions)}
    if name == "parallel_adapter":
        return {name: ParallelAdapter(m, s.r, s.scale, s.dropout)}
    raise AssertionError(f"no injection rule for {name}")
