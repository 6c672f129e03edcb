"""Data parallelism over torch.distributed, as torchrun (or accelerate launch) starts it.

Every process holds the whole model and trains on its share of each effective batch; after the
backward passes of a step the gradients of the trainable tensors alone (one flat buffer, the
frozen base weights never travel) and the step's loss sum and unit count are summed over
processes, so every process takes the same optimizer step. We reduce once per optimizer step
rather than wrapping the model in DistributedDataParallel: a task calls the model as it likes
(Task.loss), processes may run different numbers of micro-batches, and the engine normalises by
the global unit count, which is only known after the forward passes. Rank 0 alone writes files."""
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


def reduce_step(ctx, params, loss_sum, count):
    """Sum gradients, loss and count over processes; divide the gradients by the global count.
    Returns the global (loss sum, count) as a float64 tensor on the device: reading it is the
    caller's one host synchronisation of the step."""
    stats = torch.stack([loss_sum.detach().double().reshape(()),
                         torch.as_tensor(count, dtype=torch.float64, device=loss_sum.device).reshape(())])
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if ctx.world > 1:
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        stats = stats.to(flat.device)
        dist.all_reduce(flat)
        dist.all_reduce(stats)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
    torch._foreach_div_([p.grad for p in params], stats[1].clamp_min(1.0))
    return stats


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
