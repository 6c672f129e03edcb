"""One recurrent decoding step of the whole language model replayed as a CUDA graph.

On the kernel path (models/mixer_cuda.py) a decoding step updates the cache's conv and SSM tensors
in place, so the step has fixed input and output addresses and can be captured once and replayed:
one launch per token instead of hundreds of small ones (the step is launch-bound, not GPU-bound).
Used by `MambaForCausalLM.generate` on CUDA in eval mode after the first eager step.
"""
import torch


def _state_tensors(cache):
    return [t for layer in cache.layers for t in (*layer.conv, *layer.ssm)]


class GraphStep:
    def __init__(self, model, cache, token):
        self.model, self.cache = model, cache
        self.token = token.clone()
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
        with torch.cuda.graph(self.graph):
            self.logits = model(self.token, cache=cache).logits
        for t, s in zip(tensors, saved):
            t.copy_(s)
        cache.seqlen_offset = offset

    def __call__(self, token):
        self.token.copy_(token)
        self.graph.replay()
        self.cache.seqlen_offset += token.shape[1]
        return self.logits


def usable(model, cache):
    """CUDA, eval mode, the kernel path, and a cache already stepped once on it."""
    if not model.lm_head.weight.is_cuda or model.training or torch.is_grad_enabled():
        return False
    from ..ops.scan import resolve_backend
    if resolve_backend(model.lm_head.weight) != "cuda":
        return False
    return all(t.is_cuda and t.is_contiguous() for t in _state_tensors(cache))
