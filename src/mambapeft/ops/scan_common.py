"""What the two hand-written scan Functions (scan_cpu.py, scan_chunked.py) share: the time-major
fp32 inputs, the D skip and z gate around the scan, and the gradients that follow from dh.
They differ only in how a stretch of states h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t is computed."""
import torch
import torch.nn.functional as F


def time_major(x):
    """(b, C, L) -> contiguous fp32 (L, b, C)."""
    return x.float().permute(2, 0, 1).contiguous()


def prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """-> dt_raw, dt, ut, Bt, Ct (time-major), At (N, E) and dtu = dt * u."""
    dt_raw = time_major(delta)
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.float()  # not in place: time_major may return delta itself
    dt = F.softplus(dt_raw) if delta_softplus else dt_raw
    ut, Bt, Ct, At = time_major(u), time_major(B), time_major(C), A.float().t().contiguous()
    return dt_raw, dt, ut, Bt, Ct, At, dt * ut


def first_bounds(count, b, N, E, initial_state, device):
    """(count, b, N, E) states at stretch boundaries; the first is the initial state (or 0)."""
    bounds = torch.empty(count, b, N, E, dtype=torch.float32, device=device)
    if initial_state is None:
        bounds[0].zero_()
    else:
        bounds[0].copy_(initial_state.transpose(1, 2))
    return bounds


def finish_forward(ctx, y, inputs, D, z, dt_raw, ut, Bt, Ct, bounds, delta_softplus, T):
    """y (L, b, E) of the scan alone -> the output (b, E, L) with D skip and z gate; saves for backward."""
    u, delta, A, B, C, _, _, delta_bias, initial_state = inputs
    if D is not None:
        y.addcmul_(ut, D.float())
    y = y.permute(1, 2, 0).contiguous()
    out_pre = y  # needed for the gradient of z
    if z is not None:
        y = y * F.silu(z.float())
    ctx.save_for_backward(A, D, z, dt_raw, ut, Bt, Ct, bounds, out_pre if z is not None else None)
    ctx.delta_softplus, ctx.T = delta_softplus, T
    keep_dtypes(ctx, inputs)
    return y.to(u.dtype), bounds[-1].transpose(1, 2).contiguous()


def start_backward(ctx, dout, dlast):
    """-> the saved tensors, dy (L, b, E) of the scan alone, dz, dt, At, dtu and the carry dlast."""
    A, D, z, dt_raw, ut, Bt, Ct, bounds, out_pre = ctx.saved_tensors
    L, b, E = ut.shape
    f32 = {"dtype": torch.float32, "device": ut.device}
    dout = dout.float() if dout is not None else torch.zeros(b, E, L, **f32)
    dz = None
    if z is not None:
        zf = z.float()
        sz = torch.sigmoid(zf)
        dz = (1 - sz).mul_(zf).add_(1).mul_(sz).mul_(out_pre).mul_(dout)  # silu'(z) * out_pre * dout
        dout = sz.mul_(zf).mul_(dout)  # silu(z) * dout
    dt = F.softplus(dt_raw) if ctx.delta_softplus else dt_raw
    carry = torch.zeros(b, A.shape[1], E, **f32) if dlast is None else dlast.float().transpose(1, 2).contiguous()
    return (A, D, dt_raw, ut, Bt, Ct, bounds), time_major(dout), dz, dt, A.float().t().contiguous(), dt * ut, carry


def finish_backward(ctx, A, D, dt_raw, ut, dyt, du, ddt, dAt, dB, dC, dz, carry):
    """The gradients of (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)."""
    dD = None
    if D is not None:
        dD = (dyt * ut).sum((0, 1))
        du.addcmul_(dyt, D.float())
    if ctx.delta_softplus:
        ddt.mul_(torch.sigmoid(dt_raw))
    grads = (du.permute(1, 2, 0), ddt.permute(1, 2, 0), dAt.t(), dB.permute(1, 2, 0), dC.permute(1, 2, 0),
             dD, dz, ddt.sum((0, 1)), None, carry.transpose(1, 2))
    return tuple(g if g is None else g.contiguous() for g in input_grads(ctx, grads))


def keep_dtypes(ctx, inputs):
    """Note the dtypes of a scan Function's nine tensor inputs (u, delta, A, B, C, D, z, delta_bias,
    initial_state; None where absent), for input_grads."""
    ctx.dtypes = [None if x is None else x.dtype for x in inputs]


def input_grads(ctx, grads):
    """The gradients of (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state), each in its
    input's dtype; None where the input is absent or needs none."""
    dtypes = ctx.dtypes[:8] + [None] + ctx.dtypes[8:]
    return tuple(None if g is None or dtype is None or not need else g.to(dtype)
                 for g, dtype, need in zip(grads, dtypes, ctx.needs_input_grad))
