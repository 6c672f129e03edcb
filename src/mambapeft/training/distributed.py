"""Data parallelism over torch.distributed, as torchrun (or accelerate launch) starts it.

Every process holds the whole model and trains on its share of each effective batch; during the
last backward pass of a step the gradients of the trainable tensors alone (the frozen base weights
never travel) are summed over processes, then the step's loss sum and unit count, so every process
takes the same optimizer step. We do not wrap the model in DistributedDataParallel: a task calls
the model as it likes (Task.loss), processes may run different numbers of micro-batches, and the
engine normalises by the global unit count, which is only known after the forward passes; the
gradient hooks of GradSync overlap the traffic with the backward pass as DDP would. Rank 0 alone
writes files."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup(device="auto"):
    """The process's rank, world size and device; joins the process group torchrun describes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Context(rank, world, local, dev)


class GradSync:
    """Sums the trainable tensors' gradients over processes. Each gradient's all-reduce starts as
    soon as the step's last backward pass has produced it (as DistributedDataParallel does), so
    the traffic overlaps the rest of that backward; `finish` waits for them, sums the step's loss
    and unit count, and divides the gradients by the global count. Every process must produce the
    same gradients in the same order, which one model with one graph does.

    overlap=False (training.cuda_graph: a replayed backward runs no Python hooks): no hooks; `finish`
    sums all gradients in one all-reduce per dtype, after the step's backward passes."""

    def __init__(self, ctx, params, overlap=True):
        self.ctx, self.params, self.armed, self.pending = ctx, params, False, []
        hooked = ctx.world > 1 and overlap
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params] if hooked else []

    def _ready(self, p):
        if self.armed:
            self.pending.append((p, dist.all_reduce(p.grad, async_op=True)))

    def arm(self):
        """Call before the step's last backward pass."""
        self.armed = True

    def close(self):
        """Remove the hooks: the base model may be trained again (the search re-wraps it per trial)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def finish(self, loss_sum, count):
        """Returns the global (loss sum, count) as a float64 tensor on the device: reading it is
        the caller's one host synchronisation of the step."""
        self.armed = False
        stats = torch.stack([loss_sum.detach().double().reshape(()),
                             torch.as_tensor(count, dtype=torch.float64, device=loss_sum.device).reshape(())])
        for p in self.params:   # a tensor the graph did not reach: zeros, summed all the same
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.ctx.world > 1:
            done = set()
            for p, handle in self.pending:
                handle.wait()
                done.add(p)
            self.pending = []
            _all_reduce_flat([p.grad for p in self.params if p not in done])
            dist.all_reduce(stats)
        torch._foreach_div_([p.grad for p in self.params], stats[1].clamp_min(1.0))
        return stats


def _all_reduce_flat(tensors):
    """Sum tensors over processes with one all-reduce per dtype (not one per tensor)."""
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        torch._foreach_copy_(group, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in group]), group)])


def broadcast(ctx, obj):
    """rank 0's value of a small picklable object (metrics, a stop flag) on every process."""
    if ctx.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_params(ctx, params):
    if ctx.world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def gather_rng(ctx, state):
    """Every process's RNG state (a dict of plain values) on rank 0, as a list by rank."""
    if ctx.world == 1:
        return [state]
    out = [None] * ctx.world
    dist.all_gather_object(out, state)
    return out


def barrier(ctx):
    if ctx.world > 1:
        dist.barrier()
