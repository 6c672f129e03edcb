"""Named configurations of the paper's single-method runs (METHODS.md §4)."""
from .config import ConfigError, PeftConfig

# sll_lora's rank multiplier per size (METHODS.md §4); "7b" (falcon-mamba-7b, D=4096) is our extrapolation
# of the doubling per size step, not a run of the paper.
LM_SIZES = {"130m": 1, "370m": 2, "790m": 4, "1.4b": 8, "2.8b": 16, "7b": 32}

VIM = {
    "lora_in_proj": {"lora_in_proj": {"r": 32}},
    "lora_X": {"lora_X": {"r": 64}},
    "lora_Z": {"lora_Z": {"r": 64}},
    "lora_out_proj": {"lora_out_proj": {"r": 96}},
    "lora_x_proj": {"lora_x_proj": {"r": 64}},
    "lora_d": {"lora_d": {"r": 64}},
    "lora_B": {"lora_B": {"r": 64}},
    "lora_C": {"lora_C": {"r": 64}},
    "lora_dt": {"lora_dt": {"r": 64}},
    "parallel_adapter": {"parallel_adapter": {"r": 32}},
    "prompt": {"prompt": {"tokens": 8}},
    "affix": {"affix": {"tokens": 3, "dual": True}},
    "affix_base": {"affix": {"tokens": 2, "dual": True}},
    "additional_scan": {"additional_scan": {"states": 6}},
    "A": {"A": {}}, "D": {"D": {}}, "conv1d": {"conv1d": {}}, "bias": {"bias": {}},
    "cls": {"cls": {}}, "pos": {"pos": {}},
    "linear_probe": {}, "full": {"full": {}},
}
LM = {
    "lora_X": {"lora_X": {"r": 64}},
    "lora_in_proj": {"lora_in_proj": {"r": 32}},
    "additional_scan": {"additional_scan": {"states": 6}},
    "affix": {"affix": {"tokens": 3, "projection": False}},
    "full": {"full": {}},
}


def sll_lora(size="130m"):
    """"SLL LoRA": LoRA r=8*scale on out_proj, in_proj, x_proj and the embedding, s=1."""
    if size not in LM_SIZES:
        raise ConfigError(f"unknown model size {size!r} for sll_lora; expected one of {', '.join(LM_SIZES)}")
    r = 8 * LM_SIZES[size]
    return {m: {"r": r, "scale": 1.0} for m in ("lora_out_proj", "lora_in_proj", "lora_x_proj", "lora_embed")}


def preset(name, model="lm", size="130m"):
    """PeftConfig of a named run; Vim presets also train the head, as every vision run does."""
    if model == "vim":
        if name not in VIM:
            raise ConfigError(f"unknown Vim preset {name!r}; expected one of {', '.join(VIM)}")
        return PeftConfig({**VIM[name], "head": {}})
    if name == "sll_lora":
        return PeftConfig(sll_lora(size))
    if name not in LM:
        raise ConfigError(f"unknown language preset {name!r}; expected one of sll_lora, {', '.join(LM)}")
    return PeftConfig(dict(LM[name]))


def preset_names(model="lm"):
    return list(VIM) if model == "vim" else ["sll_lora", *LM]
