"""One recurrent decoding step of the whole language model replayed as a CUDA graph.

On the kernel path (models/mixer_cuda.py) a decoding step updates the cache's conv and SSM tensors
in place, so the step has fixed input and output addresses and can be captured once and replayed:
one launch per token instead of hundreds of small ones (the step is launch-bound, not GPU-bound).
Used by `MambaForCausalLM.generate` on CUDA in eval mode.

A captured step is kept for the next generate() calls (like mamba_ssm's graph cache), with its own
state tensors into which each call's prefilled state is copied: capturing costs a warm-up step and
the capture itself (40-80 ms for mamba-130m on the H200, a tenth of 256 tokens). It is reused only
while everything it baked in is unchanged: the same tensors at the same addresses (weights updated
in place are read afresh at each replay), the same plain attributes on every module (adapter
scales and switches, training flags) and the same hooks; anything else captures again.
"""
import weakref
from collections import OrderedDict

import torch

KEEP = 2   # captured steps kept per model (each holds its batch's state tensors and a memory pool)
_steps = weakref.WeakKeyDictionary()   # model -> OrderedDict(key -> GraphStep)


def _state_tensors(cache):
    return [t for layer in cache.layers for t in (*layer.conv, *layer.ssm)]


class GraphStep:
    """Captured on `cache` after one eager step on it (its tensors must then be in place); keeps no
    reference to the model, so that the cache of steps does not keep models alive."""

    def __init__(self, model, cache, token):
        self.cache = cache
        self.token = token.clone()
        # streams, the capture and replays belong to the current device: the model's here (it may be on
        # cuda:1 in a process whose current device is cuda:0)
        self.device = token.device
        with torch.cuda.device(self.device):
            self._capture(model)

    def _capture(self, model):
        cache = self.cache
        tensors = _state_tensors(cache)
        saved, offset = [t.clone() for t in tensors], cache.seqlen_offset
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up off the capture (lazy inits, autotuning)
            model(self.token, cache=cache)
        torch.cuda.current_stream().wait_stream(side)
        if [id(t) for t in _state_tensors(cache)] != [id(t) for t in tensors]:
            raise RuntimeError("the decoding step replaced its cache tensors; it cannot be captured")
        self.graph = torch.cuda.CUDAGraph()
        # captured on this device's stream: torch's default capture stream belongs to the device that was
        # current when it was first made, and a capture there records none of this device's kernels
        with torch.cuda.graph(self.graph, stream=side):
            self.logits = model(self.token, cache=cache).logits
        for t, s in zip(tensors, saved):
            t.copy_(s)
        cache.seqlen_offset = offset

    def load(self, cache):
        """Continue from `cache`'s state (another generate() call's prefill): copied into ours."""
        for mine, theirs in zip(_state_tensors(self.cache), _state_tensors(cache)):
            mine.copy_(theirs)
        self.cache.seqlen_offset = cache.seqlen_offset

    def __call__(self, token):
        self.token.copy_(token)
        with torch.cuda.device(self.device):
            self.graph.replay()
        self.cache.seqlen_offset += token.shape[1]
        return self.logits


def usable(model, cache):
    """CUDA, eval mode, the kernel path, and a cache filled on it."""
    if not model.lm_head.weight.is_cuda or model.training or torch.is_grad_enabled():
        return False
    from ..ops.scan import resolve_backend
    if resolve_backend(model.lm_head.weight) != "cuda":
        return False
    return all(t is not None and t.is_cuda and t.is_contiguous() for t in _state_tensors(cache))


PLAIN = (bool, int, float, str, type(None))


def fingerprint(model):
    """What a captured step depends on besides the values in its tensors: every parameter's, buffer's
    and tensor attribute's address, dtype and shape, every module's plain attributes and its hooks."""
    parts = []
    for m in model.modules():
        attrs = []
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                v = (v.data_ptr(), v.dtype, tuple(v.shape))
            elif isinstance(v, (tuple, list)) and all(isinstance(x, PLAIN) for x in v):
                v = tuple(v)
            elif isinstance(v, dict) and k.endswith("hooks"):   # a hook added later would not run in a replay
                v = tuple(map(id, v.values()))
            elif not isinstance(v, PLAIN):
                continue
            attrs.append((k, v))
        tensors = [(k, t.data_ptr(), t.dtype, tuple(t.shape)) for d in (m._parameters, m._buffers)
                   for k, t in d.items() if t is not None]
        parts.append((type(m).__qualname__, tuple(attrs), tuple(tensors)))
    return tuple(parts)


def step_for(model, cache, token, capture):
    """A captured step that continues from `cache`: a kept one whose model and shapes match (the
    cache's state copied into it), else, when `capture`, a new one captured on `cache` (which must
    have taken one eager step), else None."""
    key = (tuple(token.shape), token.dtype, token.device, tuple((t.shape, t.dtype) for t in _state_tensors(cache)),
           fingerprint(model))
    kept = _steps.setdefault(model, OrderedDict())
    step = kept.get(key)
    if step is not None:
        kept.move_to_end(key)
        step.load(cache)
        return step
    if not capture:
        return None
    step = kept[key] = GraphStep(model, cache, token)
    while len(kept) > KEEP:
        kept.popitem(last=False)
    return step


def release(model):
    """Drop the steps kept for `model` (their state tensors and graph memory)."""
    _steps.pop(model, None)
