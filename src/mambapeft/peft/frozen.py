"""Frozen matmul weights stored in the autocast dtype (issue 13).

Under bf16 autocast a weight that only matrix products read is cast to bf16 at every use: a copy
kernel per weight and step, and the copy is saved for backward. Stored in bf16, the product reads
the very values autocast's cast would have given, so the result is bit-identical and the casts,
their launches and their saved copies are gone (at the mamba-1.4b shape the fp32 frozen weights
are 5.6 GB)."""
import torch

from .inject import mixers


def castable_weights(model):
    """Every mixer's frozen in_proj, out_proj, x_proj and dt_proj weight that no attached adapter
    computes on (MixerAdapter.edited_weights: weight-form LoRA and DoRA add to theirs).

    Not: biases (dt_proj's is read in fp32 by the scan), conv1d, A_log, D, norms, embeddings and the
    tied LM head (the embedding feeds the fp32 residual stream), patch embedding, heads."""
    out = []
    for m in mixers(model):
        edited = {id(w) for a in m.peft.values() for w in a.edited_weights(m)}
        out += [w for w in m.matmul_weights() if not w.requires_grad and id(w) not in edited]
    return out


@torch.no_grad()
def cast_frozen(model, dtype):
    """Store castable_weights(model) in `dtype` in place (the same Parameter objects); returns how
    many weights (elements) changed dtype. Call it after attaching the adapters, for training under
    autocast to `dtype`: without autocast a bf16 weight meets fp32 activations and the product
    fails. The cast is one-way: the fp32 values are gone (reload the model to get them back)."""
    n = 0
    for w in castable_weights(model):
        if w.dtype != dtype:
            w.data = w.data.to(dtype)
            n += w.numel()
    return n
