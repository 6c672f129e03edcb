"""Stand-ins for the CUDA kernels ops/mamba_inner.py calls, in plain torch, so that its autograd
plumbing (layouts, in-place gradient buffers, which gradients it skips) is checked on the CPU.

They follow the kernels' calling conventions as read from causal_conv1d 1.7.0 and mamba_ssm 2.3.2
(selective_scan.cpp, cpp_functions.py): the same dtype and stride checks, outputs allocated with
`empty_like` of the same inputs (so they keep those inputs' layout), dz and dx written into the
buffers passed in, dB / dC returned in B's dtype. The math is the reference scan's and conv's, with
gradients from torch autograd. The GPU tests hold the real kernels against the reference path.
"""
import pathlib
import re

import torch
import torch.nn.functional as F

from mambapeft.ops import scan_cuda_ext
from mambapeft.ops.scan_ref import selective_scan_ref

SCAN_H = pathlib.Path(scan_cuda_ext.__file__).parent / "csrc" / "scan.h"
# its default knobs: MAMBAPEFT_SCAN_LANES_MIN as "LANES_MIN", ...
SCAN_KNOBS = {k: int(v) for k, v in re.findall(r"#define MAMBAPEFT_SCAN_(\w+) (\d+)", SCAN_H.read_text())}


def _check_time_contiguous(*ts):
    for t in ts:
        assert t.stride(-1) == 1 or t.shape[-1] == 1, f"time not contiguous: strides {t.stride()}"


def _conv(x, weight, bias):
    k = weight.shape[-1]
    return F.silu(F.conv1d(F.pad(x.float(), (k - 1, 0)), weight.float()[:, None],
                           None if bias is None else bias.float(), groups=x.shape[1]))


def conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    assert silu and seq_idx is None and initial_states is None and final_states_out is None
    assert x.stride(2) == 1, "channel-first layout expected"
    assert bias is None or bias.dtype == weight.dtype
    out = torch.empty_like(x)
    out.copy_(_conv(x, weight, bias))
    return out


def conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinit, silu):
    assert silu and not return_dinit and x.stride(2) == 1
    assert dx is not None and dx.dtype == x.dtype and dx.stride(2) == 1
    with torch.enable_grad():
        xs = x.detach().float().requires_grad_()
        w = weight.detach().float().requires_grad_()
        bs = bias.detach().float().requires_grad_() if bias is not None else None
        out = _conv(xs, w, bs)
        grads = torch.autograd.grad(out, [t for t in (xs, w, bs) if t is not None], dout.float())
    dx.copy_(grads[0])
    return dx, grads[1].to(weight.dtype), grads[2].to(bias.dtype) if bias is not None else None, None


def _check_aligned_if_even(L, *ts):
    """The kernel loads a sequence whose length fills its chunks (128, 256, 512, 1024 or 2048 positions)
    with 16-byte vector loads: every row it reads must start on a 16-byte boundary."""
    chunk = 128 if L <= 128 else 256 if L <= 256 else 512 if L <= 512 else 1024 if L <= 1024 else 2048
    if L % chunk:
        return
    for t in ts:
        size = t.element_size()
        assert t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1]), \
            f"misaligned rows for the kernel's vector loads: offset {t.storage_offset()}, strides {t.stride()}"


class FakeSelectiveScanCuda:
    """selective_scan_cuda.fwd / .bwd (variable B and C of shape (b, 1, N, L), with or without z: without,
    fwd returns [out, states] and bwd no dz / out_z, as the kernel does)."""

    @staticmethod
    def _checks(u, delta, A, B, C, D, z, delta_bias):
        it = u.dtype
        assert delta.dtype == it and B.dtype == it and C.dtype == it, "input dtypes differ"
        assert z is None or z.dtype == it, "input dtypes differ"
        assert A.dtype == torch.float32 and D.dtype == torch.float32 and delta_bias.dtype == torch.float32
        assert B.dim() == 4 and B.shape[1] == 1 and C.shape == B.shape
        _check_time_contiguous(u, delta, B, C, *(() if z is None else (z,)))
        _check_aligned_if_even(u.shape[-1], u, delta, B, C, *(() if z is None else (z,)))

    @staticmethod
    def _math(u, delta, A, B, C, D, z, delta_bias):
        y = selective_scan_ref(u.float(), delta.float(), A, B[:, 0].float(), C[:, 0].float(), D, None,
                               delta_bias, True)
        return y, y if z is None else y * F.silu(z.float())

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, softplus):
        assert softplus
        self._checks(u, delta, A, B, C, D, z, delta_bias)
        y, yz = self._math(u, delta, A, B, C, D, z, delta_bias)
        out = torch.empty_like(delta)
        out.copy_(y)
        states = torch.zeros(u.shape[0], u.shape[1], 1, 2 * A.shape[1])   # the kernel's chunk states (unused here)
        if z is None:
            return [out, states]
        out_z = torch.empty_like(z)
        out_z.copy_(yz)
        return [out, states, out_z]

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, states, out, dz, softplus, recompute_out_z):
        assert softplus
        self._checks(u, delta, A, B, C, D, z, delta_bias)
        assert dout.dtype == u.dtype and (z is None) == (out is None)
        assert out is None or out.dtype == u.dtype
        _check_time_contiguous(dout, *(() if out is None else (out,)))
        leaves = [t if t is None else t.detach().float().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
        with torch.enable_grad():
            _, yz = self._math(*leaves)
            grads = torch.autograd.grad(yz, [t for t in leaves if t is not None], dout.float())
        if z is None:
            grads = grads[:6] + (None,) + grads[6:]
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        du.copy_(grads[0])
        ddelta.copy_(grads[1])
        if z is None:
            return [du, ddelta, grads[2], grads[3].to(B.dtype), grads[4].to(C.dtype), grads[5], grads[7]]
        if dz is None:
            dz = torch.empty_like(z)
        dz.copy_(grads[6])
        res = [du, ddelta, grads[2], grads[3].to(B.dtype), grads[4].to(C.dtype), grads[5], grads[7], dz]
        if recompute_out_z:
            out_z = torch.empty_like(out)
            out_z.copy_(self._math(u, delta, A, B, C, D, z, delta_bias)[1])
            res.append(out_z)
        return res


def install(monkeypatch):
    """Route ops/mamba_inner.py's kernel calls to the stand-ins."""
    from mambapeft.ops import mamba_inner
    monkeypatch.setattr(mamba_inner, "selective_scan_cuda", FakeSelectiveScanCuda())
    monkeypatch.setattr(mamba_inner, "conv_fwd", conv_fwd)
    monkeypatch.setattr(mamba_inner, "conv_bwd", conv_bwd)


class FakeScanExt:
    """Our CUDA scan extension (ops/csrc/scan_binding.cpp): fwd / bwd with its checks (u, delta, B, C,
    z, dout in one dtype, time contiguous; A, D, bias, h0, dlast contiguous fp32; dA, dB, dC, dD, dbias
    fp32 zeros to sum into), writing into the outputs it is handed; the math is the reference scan's."""

    @staticmethod
    def chunk_size(L):
        return 32 if L <= 32 else 256 if L <= 256 else 512 if L <= 512 else 1024 if L <= 1024 else 2048

    def n_states(self, batch, dim, dstate, L, forward_kernel, backward_kernel, pieces):
        """The states a channel the forward keeps: one a chunk (the backward's pieces of time, which change
        only where the lanes kernels' blocks overflow a GPU, are held against the whole in test_scan_cuda_ext)."""
        return -(-L // self.chunk_size(L))

    def _checks(self, u, delta, A, B, C, D, z, bias, h0, states):
        for t in (delta, B, C) + (() if z is None else (z,)):
            assert t.dtype == u.dtype and t.shape[0] == u.shape[0] and t.shape[2] == u.shape[2]
        _check_time_contiguous(u, delta, B, C, *(() if z is None else (z,)))
        for t in (A, D, bias, h0, states):
            assert t is None or (t.dtype == torch.float32 and t.is_contiguous()), "fp32 contiguous expected"
        b, E, L = u.shape
        assert states.shape == (b, E, self.n_states(b, E, A.shape[1], L, 0, 0, 0), A.shape[1])

    @staticmethod
    def _math(u, delta, A, B, C, D, z, bias, h0, softplus):
        return selective_scan_ref(u.float(), delta.float(), A, B.float(), C.float(), D,
                                  None if z is None else z.float(), bias, softplus, h0, return_last_state=True)

    @staticmethod
    def lanes(batch, dim, dstate):
        """scan.h's lanes() for both directions, from the header's default knobs."""
        k = SCAN_KNOBS
        return dstate <= 8 * min(k["LANES_STATES"], k["LANES_BWD_STATES"]) and \
            batch * dim >= max(k["LANES_MIN"], k["LANES_BWD_MIN"])

    def fwd(self, u, delta, A, B, C, D, z, bias, h0, softplus, y, states, kernel):
        assert kernel in (0, 1, 2)
        self._checks(u, delta, A, B, C, D, z, bias, h0, states)
        out, _ = self._math(u, delta, A, B, C, D, z, bias, h0, softplus)
        if y is not None:
            assert y.dtype == u.dtype and y.stride(2) == 1
            y.copy_(out)
        chunk = self.chunk_size(u.shape[2])
        for c in range(states.shape[2]):   # the state at each chunk's end
            end = min((c + 1) * chunk, u.shape[2])
            states[:, :, c] = self._math(u[..., :end], delta[..., :end], A, B[..., :end], C[..., :end], None, None,
                                         bias, h0, softplus)[1]

    def bwd(self, u, delta, A, B, C, D, z, bias, h0, softplus, states, dout, dlast, du, ddelta, dA, dB, dC, dD,
            dbias, dz, out_z, dh0, kernel):
        assert kernel in (0, 1, 2)
        self._checks(u, delta, A, B, C, D, z, bias, h0, states)
        for t in (dA, dB, dC, dD, dbias):
            assert t is None or (t.dtype == torch.float32 and t.is_contiguous() and not t.any()), "fp32 zeros expected"
        for t in (dout, du, ddelta, dz, out_z):
            assert t is None or (t.dtype == u.dtype and t.stride(2) == 1)
        assert (z is None) == (dz is None)
        init = h0 if h0 is not None else torch.zeros_like(dh0)
        leaves = [t if t is None else t.detach().float().requires_grad_()
                  for t in (u, delta, A, B, C, D, z, bias, init)]
        present = [t for t in leaves if t is not None]
        with torch.enable_grad():
            y, last = self._math(*leaves, softplus)
            loss = (last * dlast).sum() if dlast is not None else 0
            if dout is not None:
                loss = loss + (y * dout.float()).sum()
            grads = torch.autograd.grad(loss, present, allow_unused=True)
        by_leaf = {id(t): g if g is not None else torch.zeros_like(t) for t, g in zip(present, grads)}
        u_, delta_, A_, B_, C_, D_, z_, bias_, init_ = (by_leaf.get(id(t)) for t in leaves)
        du.copy_(u_)
        ddelta.copy_(delta_)
        for total, grad in ((dA, A_), (dB, B_), (dC, C_), (dD, D_), (dbias, bias_)):
            if total is not None:
                total.add_(grad)
        if dz is not None:
            dz.copy_(z_)
        dh0.copy_(init_)
        if out_z is not None:
            out_z.copy_(y)


def install_scan_ext(monkeypatch):
    """Route ops/scan_cuda_ext.py to FakeScanExt (and call it available)."""
    from mambapeft.ops import scan_cuda_ext
    fake = FakeScanExt()
    monkeypatch.setattr(scan_cuda_ext, "extension", lambda: fake)
    monkeypatch.setattr(scan_cuda_ext, "available", lambda: True)
