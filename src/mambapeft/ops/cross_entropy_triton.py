"""The cross-entropy of one chunk of logits and its gradient, in one Triton kernel.

In torch the chunk's loss and softmax take an fp32 copy of the logits, a logsumexp, a gather, an
in-place subtract and exp, a scatter and a scaled cast back: about eight passes over (rows, vocab)
values, which on the H200 made the LM head 10 ms of a 52 ms LoRA step at 8 x 1024 tokens and a 50k
vocabulary (bench/results/issue13/). Here each row is read twice (an online max and sum of exp, then
the softmax) and its gradient, (softmax - onehot) / count, written over the logits in their dtype,
ready for the matmul that gives the hidden states' gradient. The sums are fp32, as in torch.
"""
import torch
import triton
import triton.language as tl

from . import device_of

BLOCK_V = 4096


@triton.jit
def _ce_kernel(logits_ptr, labels_ptr, loss_ptr, inv_count_ptr, V, stride,
               WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    ptr = logits_ptr + row.to(tl.int64) * stride
    offs = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    ok = label >= 0                                          # ignored rows carry a negative label
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)        # running max and sum of exp, per lane
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    v0 = 0
    while v0 < V:
        x = tl.load(ptr + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(x == float("-inf"), 0.0,
                                                                                     tl.exp(x - m_new))
        m = m_new
        v0 += BLOCK_V
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    x_label = tl.load(ptr + tl.maximum(label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ok, lse - x_label, 0.0))
    if WRITE_GRAD:
        scale = tl.where(ok, tl.load(inv_count_ptr), 0.0)
        v0 = 0
        while v0 < V:
            idx = v0 + offs
            x = tl.load(ptr + idx, mask=idx < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(idx == label, 1.0, 0.0)
            tl.store(ptr + idx, (p * scale).to(logits_ptr.dtype.element_ty), mask=idx < V)
            v0 += BLOCK_V


def chunk_loss_and_grad(logits, labels, inv_count, want_grad):
    """logits (m, V), labels (m,) with a negative value for ignored rows, inv_count a device scalar
    (1 / the number of counted tokens) -> per-row losses (m,) fp32, 0 on ignored rows. With
    want_grad, the logits are overwritten with the gradient of sum(losses) * inv_count."""
    assert logits.stride(1) == 1, "the vocabulary must be contiguous"
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    with device_of(logits):
        _ce_kernel[(logits.shape[0],)](logits, labels, loss, inv_count, logits.shape[1], logits.stride(0),
                                       WRITE_GRAD=want_grad, BLOCK_V=BLOCK_V, num_warps=8)
    return loss
