"""The selective scan for GPUs without the mamba_ssm kernels: plain torch ops, O(sqrt L) launches.

Same semantics and shapes as scan_ref.py; the structure is scan_cpu.py's (time-major tensors, a
(b, N, E) state, states saved only at segment boundaries and recomputed in backward), but the
recurrence inside a segment is a parallel chunked scan instead of one launch per time step:

    h_t = a_t h_{t-1} + x_t,   a_t = exp(dt_t A) in [0, 1],   x_t = dt_t u_t B_t

1. Cut the segment's n steps into nc chunks of K ~ sqrt(n) steps. For k = 1..K-1, advance ALL chunks
   one step at once (one addcmul_ over nc * b*N*E elements), starting every chunk from zero, and keep
   P = the running product of a inside each chunk.
2. Carry the chunk-final states across chunks: nc small steps H_c = P_c,last H_{c-1} + h_c,last.
3. Add each chunk's incoming state: h += P * H_prev, one pass.
So a segment costs ~2K + nc launches instead of n, each large enough to be memory bound on a GPU.
Only products of decays in [0, 1] are formed: exact in fp32, nothing to overflow for large dt (unlike
log-space exp(-cumsum(dt*A)) tricks). A log-depth Hillis-Steele scan inside a chunk would need fewer
launches (log2 K) but reads and writes the whole chunk log2 K times with ping-pong buffers; the
step-at-a-time loop touches each element about once, and bandwidth is what bounds this on a GPU.

The backward pass is the same scan run in reverse time on dh_t = C_t dy_t + a_{t+1} dh_{t+1}.
Memory: forward keeps (L, b, E)/(L, b, N) inputs and one state per segment; the (n, b, N, E) working
buffers (4 in backward) are bounded by SEG_BYTES each, whatever L is.
"""
import math

import torch

from .scan_common import finish_backward, finish_forward, first_bounds, prepare, start_backward

SEG_BYTES = 256 << 20  # one (n, b, N, E) fp32 working buffer: n = 341 steps at b=8, N=16, E=1536


def _chunk_len(n):
    return max(1, round(math.sqrt(n)))  # ~K + n/K sequential launches: least at K = sqrt(n)


def _padded(n):
    K = _chunk_len(n)
    return -(-n // K) * K


def _linear_scan(a, x, P, h0, reverse=False):
    """In place, x <- h where h_t = a_t h_{t-1} + x_t (reverse: h_t = a_t h_{t+1} + x_t), starting from h0.

    a, x, P: (nc, K, M) with time t = c*K + k; P is scratch; h0: (M,) or None for zero.
    Returns the state after the last step (after step 0 if reverse).
    """
    nc, K, M = x.shape
    first, last, step = (K - 1, 0, -1) if reverse else (0, K - 1, 1)
    # 1. all chunks at once, one step at a time, each from zero; P = decay from the chunk start to here
    P[:, first].copy_(a[:, first])
    for k in range(first + step, last + step, step):
        x[:, k].addcmul_(a[:, k], x[:, k - step])
        torch.mul(a[:, k], P[:, k - step], out=P[:, k])
    # 2. the state entering each chunk: S[c] in forward order (S[c + 1] in reverse), nc small steps
    S = x.new_zeros(nc + 1, M)
    if h0 is not None:
        S[nc if reverse else 0] = h0
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        src, dst = (c + 1, c) if reverse else (c, c + 1)
        torch.addcmul(x[c, last], P[c, last], S[src], out=S[dst])
    # 3. add the incoming state, decayed, to every step of its chunk
    x.addcmul_(P, (S[1:] if reverse else S[:-1])[:, None])
    return S[0] if reverse else S[-1]


def _chunks(t, n):
    """First _padded(n) rows of a time-major buffer, as (nc, K, M)."""
    K = _chunk_len(n)
    return t[:_padded(n)].view(-1, K, t[0].numel())


def _segment_states(dt, dtu, Bt, At, h0, dA, h, P):
    """Fill dA[:n] = exp(dt*A) and h[1:n+1] = the states of the segment's n steps, h[0] = h0.

    dt, dtu: (n, b, E); Bt: (n, b, N); At: (N, E); h0: (b, N, E);
    dA, h: (>= _padded(n) + 1, b, N, E) buffers; P: (>= _padded(n), b, N, E) scratch.
    """
    n, m = dt.shape[0], _padded(dt.shape[0])
    torch.mul(dt[:, :, None], At, out=dA[:n]).exp_()
    dA[n:m + 1].fill_(1)  # padding steps are the identity (decay 1, input 0); row m serves the backward
    torch.mul(dtu[:, :, None], Bt[..., None], out=h[1:n + 1])
    h[n + 1:m + 1].zero_()
    h[0].copy_(h0)
    _linear_scan(_chunks(dA, n), _chunks(h[1:], n), _chunks(P, n), h0.reshape(-1))


class SelectiveScanChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        ctx.set_materialize_grads(False)  # dout / dlast are None when unused: skip them
        b, E, L = u.shape
        N = A.shape[1]
        f32 = {"dtype": torch.float32, "device": u.device}
        dt_raw, dt, ut, Bt, Ct, At, dtu = prepare(u, delta, A, B, C, delta_bias, delta_softplus)
        T = max(1, min(L, SEG_BYTES // (4 * b * N * E)))
        starts = range(0, L, T)
        m = max(_padded(min(T, L - s)) for s in starts) if L else 0
        bounds = first_bounds(len(starts) + 1, b, N, E, initial_state, u.device)  # before each segment, and last
        dA, h = torch.empty(2, m + 1, b, N, E, **f32)
        P = torch.empty(m, b, N, E, **f32)
        y = torch.empty(L, b, E, **f32)
        for i, s in enumerate(starts):
            e = min(L, s + T)
            n = e - s
            _segment_states(dt[s:e], dtu[s:e], Bt[s:e], At, bounds[i], dA, h, P)
            torch.bmm(Ct[s:e].view(-1, 1, N), h[1:n + 1].view(-1, N, E), out=y[s:e].view(-1, 1, E))
            bounds[i + 1].copy_(h[n])
        del dA, h, P
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        return finish_forward(ctx, y, inputs, D, z, dt_raw, ut, Bt, Ct, bounds, delta_softplus, T)

    @staticmethod
    def backward(ctx, dout, dlast):
        (A, D, dt_raw, ut, Bt, Ct, bounds), dyt, dz, dt, At, dtu, carry = start_backward(ctx, dout, dlast)
        L, b, E = ut.shape
        N, T = A.shape[1], ctx.T
        f32 = {"dtype": torch.float32, "device": ut.device}
        du, ddt = torch.empty(2, L, b, E, **f32)
        dB, dC = torch.empty(2, L, b, N, **f32)
        dAt = torch.zeros(N, E, **f32)
        starts = range(0, L, T)
        m = max(_padded(min(T, L - s)) for s in starts) if L else 0
        dA, h = torch.empty(2, m + 1, b, N, E, **f32)
        g, P = torch.empty(2, m, b, N, E, **f32)
        # carry = dh_{s-1} from the segment after this one (s its first step); dlast past the end
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(L, s + T)
            n = e - s
            _segment_states(dt[s:e], dtu[s:e], Bt[s:e], At, bounds[i], dA, h, P)
            # dh_t = C_t dy_t + dA_{t+1} dh_{t+1}: the reverse scan with decays dA[1:]. The padding
            # decays are 1, so starting the reverse scan from the carry at the padded end is exact.
            gn = g[:n]
            torch.mul(dyt[s:e, :, None], Ct[s:e, ..., None], out=gn)
            g[n:].zero_()
            _linear_scan(_chunks(dA[1:], n), _chunks(g, n), _chunks(P, n), carry.view(-1), reverse=True)
            carry = dA[0] * g[0]  # d(loss)/d(state before this segment)
            # dC from the states; dB, du, ddt from dh (= d(loss)/dx_t, x_t = dt_t u_t B_t)
            hn = h[1:n + 1]
            torch.bmm(dyt[s:e].view(-1, 1, E), hn.view(-1, N, E).transpose(1, 2), out=dC[s:e].view(-1, 1, N))
            torch.bmm(dtu[s:e].view(-1, 1, E), gn.view(-1, N, E).transpose(1, 2), out=dB[s:e].view(-1, 1, N))
            gB = torch.bmm(Bt[s:e].view(-1, 1, N), gn.view(-1, N, E)).view(n, b, E)  # sum_n dh*B
            torch.mul(gB, dt[s:e], out=du[s:e])
            # q_t = dh_t * h_{t-1} * dA_t is the gradient of dt_t*A (through exp)
            q = torch.mul(gn, h[:n], out=P[:n]).mul_(dA[:n])
            torch.sum(torch.mul(q, At, out=hn), 2, out=ddt[s:e])  # h is free now: scratch
            ddt[s:e].addcmul_(gB, ut[s:e])
            if ctx.needs_input_grad[2]:
                dAt += q.mul_(dt[s:e, :, None]).sum((0, 1))
        del dA, h, g, P
        return finish_backward(ctx, A, D, dt_raw, ut, dyt, du, ddt, dAt, dB, dC, dz, carry)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           initial_state=None, return_last_state=False):
    y, last = SelectiveScanChunked.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (y, last) if return_last_state else y
