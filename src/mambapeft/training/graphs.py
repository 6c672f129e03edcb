"""A micro-batch's forward and backward replayed from a captured CUDA graph (training.cuda_graph).

On a small model the GPU finishes each of the step's several hundred kernels faster than Python can
launch the next, so an eager step leaves it idle for much of the time (bench/results/issue13/: a
LoRA step at the mamba-130m shape ran at 60-86% GPU busy eagerly, 98-99% replayed). A graph is
captured per input shape: the first micro-batch of a shape runs eagerly (it is also the warm-up the
capture needs) and later ones copy their tensors into the graph's inputs and replay it. The
gradients accumulate into .grad tensors that stay allocated (zeroed in place between steps), and the
optimizer step stays eager (fused AdamW is a few launches). A batch the capture cannot take (an op
that synchronises with the host, e.g. padding masks that move tokens) falls back to eager, once
reported. Dropout draws differ from an eager run's (graph-safe random offsets); without dropout the
result is the same.
"""
import logging

import torch

log = logging.getLogger("mambapeft")


class GraphedLoss:
    def __init__(self, task, model, params, dtype):
        """dtype: the autocast dtype (None: no autocast)."""
        self.task, self.model, self.params, self.dtype = task, model, params, dtype
        self.graphs = {}      # shape key -> (graph, static batch, loss sum, count) or None (eager)
        self.pool = torch.cuda.graph_pool_handle()   # graphs replay one at a time: one memory pool
        self.captured = self.replays = 0

    def _autocast(self):
        # no weight cache: cached casts made outside a capture must not be read by its graph
        return torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                              cache_enabled=False)

    def _eager(self, batch):
        with self._autocast():
            s, c = self.task.loss(self.model, batch)
        s.backward()
        return s.detach(), c

    def zero_grad(self):
        """Zero the gradients in place: the graphs accumulate into these very tensors."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_zero_([p.grad for p in self.params])

    def __call__(self, batch):
        """Add the batch's loss gradient to the parameters' .grad; -> (loss sum, unit count)."""
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))
        if key not in self.graphs:
            out = self._eager(batch)          # this micro-batch's real work, and the capture's warm-up
            self.graphs[key] = self._capture(batch, key)
            return out
        entry = self.graphs[key]
        if entry is None:
            return self._eager(batch)
        graph, static, s, c = entry
        for k, v in batch.items():
            static[k].copy_(v)
        graph.replay()
        self.replays += 1
        return s.clone(), c.clone() if isinstance(c, torch.Tensor) else c

    def _capture(self, batch, key):
        static = {k: v.clone() for k, v in batch.items()}
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                with self._autocast():
                    s, c = self.task.loss(self.model, static)
                s.backward()
        except Exception as e:  # noqa: BLE001 - any failure: this shape stays eager
            torch.cuda.synchronize()
            log.warning("training.cuda_graph: could not capture a batch of shapes %s (%s: %s); it runs eagerly",
                        ", ".join(f"{k} {tuple(s)}" for k, s, _ in key), type(e).__name__, str(e).splitlines()[0])
            return None
        self.captured += 1
        return graph, static, s.detach(), c

    def stats(self):
        return {"shapes_captured": self.captured, "replays": self.replays,
                "shapes_eager": sum(e is None for e in self.graphs.values())}
