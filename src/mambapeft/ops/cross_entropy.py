"""Cross-entropy of a linear LM head without materialising the (tokens, vocab) logits.

`linear_cross_entropy(h, W, labels)` equals `F.cross_entropy((h @ W.T).float(), labels,
ignore_index=-100)` (mean over the counted tokens). It walks the tokens in chunks: each chunk's
logits live only inside the loop, and when a gradient is wanted the chunk's gradients for h and W
are computed right there (softmax - onehot), so backward only scales them by the incoming gradient.
With a 50k vocabulary this removes the bf16 logits, their fp32 copy and the log-softmax
(3 x tokens x vocab values) from the activations kept for backward. The matmuls run in the autocast
dtype when autocast is on (like the LM head under autocast), else in W's dtype. On CUDA with triton,
each chunk's loss and softmax gradient come from one kernel (ops/cross_entropy_triton.py) that writes
the gradient over the chunk's logits, instead of eight torch passes over an fp32 copy.
"""
import torch

from . import cuda_triton

CHUNK_ELEMENTS = 1 << 26   # logits per chunk (256 MB in fp32)


def fused_kernel(h):
    """ops/cross_entropy_triton.py for CUDA tensors where triton imports, else None (torch)."""
    return cuda_triton("cross_entropy_triton", h)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, compute_dtype, want_grad, ignore_index):
        V = weight.shape[0]
        hc, wc = h.to(compute_dtype), weight.to(compute_dtype)
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        rows = None
        if h.device.type == "cpu":   # only the labelled rows: instruction data labels a tenth of them
            keep = (labels != ignore_index).nonzero()[:, 0]   # (on CUDA this would be a host sync)
            if len(keep) < len(labels):
                rows, hc, labels = keep, hc.index_select(0, keep), labels.index_select(0, keep)
        n = hc.shape[0]
        dh = torch.empty_like(hc) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        valid = labels != ignore_index
        count = valid.sum().float()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = max(1, CHUNK_ELEMENTS // V)
        fused = fused_kernel(h)
        if fused is not None:
            marked = torch.where(valid, labels, -1)                # the kernel skips negative labels
            inv_count = 1.0 / count
        for s in range(0, n, step):
            e = min(n, s + step)
            if fused is not None:   # loss and gradient in one kernel, the gradient over the logits
                g = hc[s:e] @ wc.t()
                total += fused.chunk_loss_and_grad(g, marked[s:e], inv_count, need_h or need_w).sum()
            else:
                logits = (hc[s:e] @ wc.t()).float()
                lab, ok = labels[s:e].clamp(min=0)[:, None], valid[s:e]
                lse = torch.logsumexp(logits, -1)
                total += ((lse - logits.gather(1, lab)[:, 0]) * ok).sum()
                if need_h or need_w:
                    g = logits.sub_(lse[:, None]).exp_()                     # softmax, in place
                    g.scatter_add_(1, lab, -ok[:, None].float())
                    g = (g * (ok[:, None] / count)).to(compute_dtype)
            if need_h:
                dh[s:e] = g @ wc
            if need_w:
                dw += (g.t() @ hc[s:e]).float()
        if rows is not None and dh is not None:   # unlabelled rows get no gradient
            dh = torch.zeros((len(h), dh.shape[1]), dtype=dh.dtype).index_copy_(0, rows, dh)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        gh = (dh * grad).to(ctx.dtypes[0]) if dh is not None else None
        gw = (dw * grad).to(ctx.dtypes[1]) if dw is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(h, weight, labels, ignore_index=-100):
    """h (n, D), weight (V, D), labels (n,) -> mean cross-entropy over labels != ignore_index."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, labels, dtype, want_grad, ignore_index)
