"""The selective scan for training on CPU: plain torch ops, a hand-written reverse-time backward.

Same semantics and shapes as scan_ref.py. Why it looks the way it does (measured on 2 CPU cores,
E=1536, N=16, L=512, forward+backward; bench/bench_scan.py):
- The recurrence h_t = exp(dt_t*A) h_{t-1} + dt_t u_t B_t is sequential, so one step is a single
  in-place addcmul_ on the whole (b, N, E) state. Everything else (exp, the outer products, the C and
  B contractions, the reductions for the dt and A gradients) runs on chunks of T steps at once.
- Chunks of a few MB keep their working set in cache: doing exp(dt*A) etc. for the whole (L, b, N, E)
  sequence at once is memory bound and 2.5-3.5x slower.
- Only the states at chunk boundaries are saved; backward recomputes a chunk's states from them. That
  is a little faster than saving every state (L*b*N*E floats of memory traffic) and needs O(L/T) memory.
- The state is laid out (b, N, E), E innermost: the contractions over N and E then become row-vector
  bmm's (1, N) @ (N, E) and (1, E) @ (E, N), which MKL runs ~7x faster than (E, N) @ (N, 1).
- A log-space chunk scan (h_t = exp(S_t) cumsum(exp(-S_s) x_s), S = cumsum(dt*A)) has no Python loop
  but its forward alone was 4-5x slower (two exps, cumsums), and exp(-S) overflows for large dt.
"""
import torch

from .scan_common import finish_backward, finish_forward, first_bounds, prepare, start_backward

CHUNK_BYTES = 3 << 20  # one (T, b, N, E) fp32 chunk: T=32 at b=1, N=16, E=1536; 0.75-6 MB are within ~15%


def _chunk_states(dt, dtu, Bt, At, h0, dA, h):
    """Fill dA = exp(dt*A) and the states h_t = dA_t h_{t-1} + dt_t u_t B_t of one chunk, from h0.

    dt, dtu: (T, b, E); Bt: (T, b, N); At: (N, E); h0: (b, N, E); dA, h: (T, b, N, E) outputs.
    """
    torch.mul(dt[:, :, None], At, out=dA).exp_()
    torch.mul(dtu[:, :, None], Bt[..., None], out=h)
    hs, dAs = h.unbind(0), dA.unbind(0)  # one call instead of a select per step
    hs[0].addcmul_(dAs[0], h0)
    for t in range(1, len(hs)):
        hs[t].addcmul_(dAs[t], hs[t - 1])


class SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        ctx.set_materialize_grads(False)  # dout / dlast are None when unused: skip them
        b, E, L = u.shape
        N = A.shape[1]
        # time-major copies are saved for backward: transposes cost more than the memory they take
        dt_raw, dt, ut, Bt, Ct, At, dtu = prepare(u, delta, A, B, C, delta_bias, delta_softplus)
        T = max(1, min(L, CHUNK_BYTES // (4 * b * N * E)))
        starts = range(0, L, T)
        bounds = first_bounds(len(starts) + 1, b, N, E, initial_state, u.device)  # before each chunk, and last
        dA, h = torch.empty(2, T, b, N, E, dtype=torch.float32, device=u.device)
        y = torch.empty(L, b, E, dtype=torch.float32, device=u.device)
        for c, s in enumerate(starts):
            e = min(L, s + T)
            n = e - s
            _chunk_states(dt[s:e], dtu[s:e], Bt[s:e], At, bounds[c], dA[:n], h[:n])
            torch.bmm(Ct[s:e].view(-1, 1, N), h[:n].view(-1, N, E), out=y[s:e].view(-1, 1, E))
            bounds[c + 1].copy_(h[n - 1])
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        return finish_forward(ctx, y, inputs, D, z, dt_raw, ut, Bt, Ct, bounds, delta_softplus, T)

    @staticmethod
    def backward(ctx, dout, dlast):
        (A, D, dt_raw, ut, Bt, Ct, bounds), dyt, dz, dt, At, dtu, carry = start_backward(ctx, dout, dlast)
        L, b, E = ut.shape
        N, T = A.shape[1], ctx.T
        f32 = dict(dtype=torch.float32, device=ut.device)
        du, ddt = torch.empty(2, L, b, E, **f32)
        dB, dC = torch.empty(2, L, b, N, **f32)
        dAt = torch.zeros(N, E, **f32)
        dA, h, g, q = torch.empty(4, T, b, N, E, **f32)
        # carry = dA_s * dh_s for the first step s of the chunk after this one: its share of dh_{s-1}
        for c in reversed(range(len(bounds) - 1)):
            s = c * T
            e = min(L, s + T)
            n = e - s
            _chunk_states(dt[s:e], dtu[s:e], Bt[s:e], At, bounds[c], dA[:n], h[:n])
            # dh_t = C_t dy_t + dA_{t+1} dh_{t+1}, which is also the gradient of x_t = dt_t u_t B_t
            gc, dAc, hc, qc = g[:n], dA[:n], h[:n], q[:n]
            torch.mul(dyt[s:e, :, None], Ct[s:e, ..., None], out=gc)
            gs, dAs = gc.unbind(0), dAc.unbind(0)
            gs[-1].add_(carry)
            for t in range(n - 2, -1, -1):
                gs[t].addcmul_(dAs[t + 1], gs[t + 1])
            torch.mul(dAs[0], gs[0], out=carry)
            # q_t = dh_t * h_{t-1} * dA_t is the gradient of dt_t*A (through exp)
            torch.mul(gc[1:], hc[:-1], out=qc[1:])
            torch.mul(gc[0], bounds[c], out=qc[0])
            qc.mul_(dAc)
            torch.bmm(dyt[s:e].view(-1, 1, E), hc.view(-1, N, E).transpose(1, 2), out=dC[s:e].view(-1, 1, N))
            torch.bmm(dtu[s:e].view(-1, 1, E), gc.view(-1, N, E).transpose(1, 2), out=dB[s:e].view(-1, 1, N))
            gB = torch.bmm(Bt[s:e].view(-1, 1, N), gc.view(-1, N, E)).view(n, b, E)  # sum_n dh*B
            torch.mul(gB, dt[s:e], out=du[s:e])
            torch.sum(hc.copy_(qc).mul_(At), 2, out=ddt[s:e])  # h is free now: use it as scratch
            ddt[s:e].addcmul_(gB, ut[s:e])
            if ctx.needs_input_grad[2]:
                dAt += qc.mul_(dt[s:e, :, None]).sum((0, 1))

        return finish_backward(ctx, A, D, dt_raw, ut, dyt, du, ddt, dAt, dB, dC, dz, carry)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_last_state=False):
    y, last = SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (y, last) if return_last_state else y
