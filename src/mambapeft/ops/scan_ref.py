"""The selective scan written as the recurrence it is: obviously right, slow.

Shapes follow mamba_ssm: u, delta, z (b, E, L); A (E, N); B, C (b, N, L); D, delta_bias (E,);
initial_state and the returned last state (b, E, N). Computation is in fp32.
"""
import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_last_state=False):
    dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, E, L = u.shape
    state = u.new_zeros(b, E, A.shape[1]) if initial_state is None else initial_state.float()
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A)                                  # (b, E, N)
        dBu = delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]          # (b, E, N)
        state = dA * state + dBu
        ys.append((state * C[:, None, :, t]).sum(-1))                             # (b, E)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, E, 0)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, state) if return_last_state else y
