"""Mamba-1 LM checkpoints: Hugging Face format (safetensors, sharded or not, or pytorch_model.bin)
and the original state-spaces/mamba format. We write the Hugging Face format."""
import re
from pathlib import Path

import torch

from ..io import CheckpointError, read_json, read_weights, resolve_dir, write_json, write_safetensors
from .config import MambaConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_state_dict(directory):
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            index = read_json(path)
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{path}: expected a 'weight_map' object mapping names to shard files")
            state = {}
            for shard in sorted(set(index["weight_map"].values())):
                inside = isinstance(shard, str) and (directory / shard).resolve().parent == directory.resolve()
                if not inside:   # a shard name must not reach files elsewhere on the machine
                    raise CheckpointError(f"{path}: shard {shard!r} is not a file name in {directory}")
                state.update(read_weights(directory / shard))
            return state
        return read_weights(path)
    raise CheckpointError(f"{directory}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def to_hf_names(state):
    """Original state-spaces/mamba names -> Hugging Face names (only the embedding differs). FalconMamba's
    mixer norms have no weights; transformers keeps dummy all-ones ones, dropped here if a file holds them."""
    return {re.sub(r"^backbone\.embedding\.", "backbone.embeddings.", k): v for k, v in state.items()
            if not re.search(r"\.mixer\.(b|c|dt)_layernorm\.weight$", k)}


def load_into(model, state, source):
    """Copy `state` into `model`, or explain exactly which names and shapes do not match."""
    own = model.state_dict()
    tied = model.config.tie_word_embeddings
    expected = {k for k in own if ".peft." not in k and not (tied and k == "lm_head.weight")}
    given = set(state) - ({"lm_head.weight"} if tied else set())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    bad_shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, config expects {tuple(own[k].shape)}"
                  for k in sorted(expected & given) if state[k].shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        lines = [f"{source}: weights do not match the config"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        lines += [f"  shape {s}" for s in bad_shapes[:20]]
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for k in expected:
            own[k].copy_(state[k])


def load_pretrained(cls, name_or_path, dtype=None):
    directory = resolve_dir(name_or_path)
    config_path = directory / "config.json"
    try:
        config = MambaConfig.from_dict(read_json(config_path), source=str(config_path))
    except ValueError as e:   # a user's file: one line for the command line
        raise CheckpointError(str(e)) from None
    if isinstance(dtype, str):   # "float16" as transformers accepts it
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or dtype == "auto":
            raise ValueError(f"dtype={dtype!r}: expected a torch.dtype or one of float32, float16, bfloat16")
        dtype = getattr(torch, dtype)
    model = build_in_dtype(cls, config, dtype)
    load_into(model, to_hf_names(read_state_dict(directory)), str(directory))
    return model.eval()   # as transformers: identical forwards give identical outputs until .train()


def build_in_dtype(cls, config, dtype=None):
    """An uninitialised model created directly in `dtype` (a 7B model in bf16 never exists in fp32)."""
    if dtype is None or not dtype.is_floating_point:
        return cls(config, init=False) if dtype is None else cls(config, init=False).to(dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return cls(config, init=False)
    finally:
        torch.set_default_dtype(old)


def save_pretrained(model, directory):
    """config.json + model.safetensors, readable by transformers.MambaForCausalLM.from_pretrained."""
    directory = Path(directory)
    state = {k: v for k, v in model.state_dict().items() if ".peft." not in k}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared tensors; transformers re-ties
    write_safetensors(directory / "model.safetensors", state, metadata={"format": "pt"})
    write_json(directory / "config.json", model.config.to_hf_dict())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name_or_path):
    """The tokenizer saved beside a model, through transformers.AutoTokenizer."""
    from transformers import AutoTokenizer
    directory = resolve_dir(name_or_path)
    if not any((directory / f).exists() for f in TOKENIZER_FILES):   # else transformers may return an empty one
        raise CheckpointError(f"{directory}: no usable tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                              "the original state-spaces/mamba models use EleutherAI/gpt-neox-20b's tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: no usable tokenizer files ({str(e).splitlines()[0]}); the "
                              "original state-spaces/mamba models use EleutherAI/gpt-neox-20b's tokenizer") from None
