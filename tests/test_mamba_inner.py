"""ops/mamba_inner.py (our fused inner function) on the CPU, its kernels replaced by the torch
stand-ins of kernel_fakes.py: outputs and gradients equal plain autograd through the readable path,
frozen weights get no gradient and their weight-gradient GEMMs are not run, any xz layout works.
The real kernels are held against the reference path in test_gpu.py. The affix prefill runs the Triton
scan, under Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before scan_triton is imported);
those tests are skipped without triton."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from kernel_fakes import install, install_scan_ext
from torch.utils._python_dispatch import TorchDispatchMode

from mambapeft.models import MambaConfig, MambaForCausalLM, VimConfig, VisionMamba, mixer_cuda
from mambapeft.models.mixer import MambaMixer
from mambapeft.ops import mamba_inner
from mambapeft.ops.scan import scan_backend
from mambapeft.ops.scan_ref import selective_scan_ref
from mambapeft.peft import PeftConfig, get_peft_model

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when scan_triton is imported
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the prefill needs triton")

b, E, L, N, R, Dm, k = 2, 8, 7, 4, 3, 6, 4
NAMES = ["conv_w", "conv_b", "x_proj_w", "dt_w", "out_w", "out_b", "A", "D", "dt_b", "out_extra"]


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    install(monkeypatch)


def tensors(flat_layout=True, extra=True):
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=0.5):
        return (torch.randn(*s, generator=g) * scale).requires_grad_()
    if flat_layout:   # what mixer_cuda's in_proj makes: (2E, bL) memory viewed as (b, 2E, L)
        xz = torch.randn(2 * E, b * L, generator=g).view(2 * E, b, L).transpose(0, 1).requires_grad_()
    else:
        xz = torch.randn(b, 2 * E, L, generator=g).requires_grad_()
    w = dict(conv_w=r(E, k), conv_b=r(E), x_proj_w=r(R + 2 * N, E), dt_w=r(E, R), out_w=r(Dm, E), out_b=r(Dm),
             A=(-torch.rand(E, N, generator=g) - 0.5).requires_grad_(), D=r(E), dt_b=r(E),
             out_extra=r(3, E) if extra else None)
    return xz, w


def readable(xz, w):
    """The same function in plain torch autograd (the reference scan)."""
    x, z = xz.chunk(2, 1)
    u = F.silu(F.conv1d(F.pad(x, (k - 1, 0)), w["conv_w"][:, None], w["conv_b"], groups=E))
    x_dbl = F.linear(u.transpose(1, 2), w["x_proj_w"])
    dt, B, C = x_dbl.split([R, N, N], -1)
    delta = F.linear(dt, w["dt_w"]).transpose(1, 2)
    y = selective_scan_ref(u, delta, w["A"], B.transpose(1, 2), C.transpose(1, 2), w["D"], z, w["dt_b"], True)
    W, bias = w["out_w"], w["out_b"]
    if w["out_extra"] is not None:
        W = torch.cat([W, w["out_extra"]])
        bias = torch.cat([bias, bias.new_zeros(w["out_extra"].shape[0])])
    return F.linear(y.transpose(1, 2), W, bias)


def grads_of(fn, xz, w):
    leaves = [xz] + [t for t in w.values() if t is not None and t.requires_grad]
    out = fn(xz, w)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scan", ["mamba_ssm", "cuda"])
@pytest.mark.parametrize("flat_layout", [True, False], ids=["flat", "contiguous"])
@pytest.mark.parametrize("frozen", [(), ("conv_w", "conv_b", "x_proj_w", "dt_w", "out_w", "out_b", "A", "D", "dt_b"),
                                    ("out_w", "A", "dt_w")], ids=["all", "only_xz_extra", "some"])
def test_inner_equals_readable_path(flat_layout, frozen, scan, monkeypatch):
    """On mamba_ssm's scan and on ours (MAMBAPEFT_INNER_SCAN)."""
    install_scan_ext(monkeypatch)
    monkeypatch.setenv("MAMBAPEFT_INNER_SCAN", scan)
    xz, w = tensors(flat_layout)
    for n in frozen:
        w[n].requires_grad_(False)
    ref_out, ref_grads = grads_of(readable, xz, w)
    out, grads = grads_of(lambda x, t: mamba_inner.mamba_inner(x, *t.values()), xz, w)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_inner_scan_auto_picks_ours_where_its_lanes_kernels_run(monkeypatch):
    """auto: our CUDA scan at training shapes (13 <= N <= 24, batch * channels >= 8192), mamba_ssm's
    elsewhere and wherever ours did not build; a misspelt MAMBAPEFT_INNER_SCAN is refused."""
    install_scan_ext(monkeypatch)
    monkeypatch.delenv("MAMBAPEFT_INNER_SCAN", raising=False)
    u = torch.empty(8, 1536, 1)
    assert mamba_inner.inner_scan(u, 16) is mamba_inner.EXT_SCAN
    assert mamba_inner.inner_scan(u, 22) is mamba_inner.EXT_SCAN   # Additional-scan's 16 + 6 states
    assert mamba_inner.inner_scan(u, 25) is mamba_inner.SCAN
    assert mamba_inner.inner_scan(u, 8) is mamba_inner.SCAN
    assert mamba_inner.inner_scan(u[:2], 16) is mamba_inner.SCAN
    from mambapeft.ops import scan_cuda_ext
    monkeypatch.setattr(scan_cuda_ext, "available", lambda: False)
    assert mamba_inner.inner_scan(u, 16) is mamba_inner.SCAN
    monkeypatch.setenv("MAMBAPEFT_INNER_SCAN", "triton")
    with pytest.raises(ValueError, match="MAMBAPEFT_INNER_SCAN='triton': expected one of auto, mamba_ssm, cuda"):
        mamba_inner.inner_scan(u, 16)


def test_frozen_weights_get_no_gradient_and_no_gemm():
    """needs_input_grad: the out_proj, x_proj and dt_proj weight GEMMs run only when wanted."""
    counts = {}
    for case in ("trainable", "frozen"):
        xz, w = tensors(extra=False)
        if case == "frozen":
            for n in NAMES[:-1]:
                w[n].requires_grad_(False)
        out = mamba_inner.mamba_inner(xz, *w.values())
        with CountMatmuls() as c:
            out.sum().backward()
        counts[case] = c.n
        assert xz.grad is not None and xz.grad.abs().sum() > 0
        for n in NAMES[:-1]:
            assert (w[n].grad is None) == (case == "frozen"), n
    assert counts["frozen"] == counts["trainable"] - 3, counts


def test_xz_gradient_keeps_the_flat_layout():
    """No copy of the xz gradient on its way back to in_proj: it comes back as (2E, bL) memory."""
    xz, w = tensors()
    mamba_inner.mamba_inner(xz, *w.values()).sum().backward()
    assert mamba_inner.is_flat(xz.grad), xz.grad.stride()


@pytest.fixture
def interpreted_triton():
    from mambapeft.ops import scan_triton
    if not scan_triton.INTERPRET:   # these tests run on CPU tensors (set only without CUDA, above)
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    scan_triton.vectorize_interpreter_scan()


PREFILL_MODES = ["cuda", pytest.param("carry", marks=needs_triton), pytest.param("triton", marks=needs_triton)]


def prefill_kernels(mode, request, monkeypatch):
    """The stand-in for our CUDA scan (mode "cuda"), or Triton's interpreter without CUDA."""
    if mode == "cuda":
        install_scan_ext(monkeypatch)
    else:
        request.getfixturevalue("interpreted_triton")


@pytest.mark.parametrize("mode", PREFILL_MODES)
@pytest.mark.parametrize("frozen", [(), ("conv_w", "conv_b", "x_proj_w", "dt_w", "out_w", "out_b", "A", "D", "dt_b")],
                         ids=["all", "only_xz_extra"])
def test_prefill_equals_extra_positions(mode, frozen, request, monkeypatch):
    """Affix tokens as a prefill (state handed on), behind zero alignment columns = the tokens as extra
    positions whose output rows are dropped: the output and every gradient, the tokens' xz columns
    included."""
    prefill_kernels(mode, request, monkeypatch)
    n, pad = 3, 2
    xz, w = tensors()
    for name in frozen:
        w[name].requires_grad_(False)
    ref_out, ref_grads = grads_of(lambda x, t: mamba_inner.mamba_inner(x, *t.values())[:, n:], xz, w)

    def prefilled(x, t):
        x = mamba_inner.flat(F.pad(x, (pad, 0)))
        return mamba_inner.mamba_inner(x, *t.values(), prefill=(mode, pad, pad + n))
    out, grads = grads_of(prefilled, xz, w)
    assert out.shape == (b, L - n, Dm + 3)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert ref_grads[0][:, :E, :n].abs().sum() > 0, "the tokens' x columns should get a gradient"
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@needs_triton
def test_carry_prefill_aligns_an_even_length_sequence(interpreted_triton, monkeypatch):
    """A 128-long sequence fills the kernel's chunk, so it loads rows with 16-byte vectors: after 3
    affix tokens the fused route pads the prefix to 8 columns (the fake kernel asserts the alignment)
    and gives the reference path's output and gradients."""
    model = build("lm", {"affix": {}})
    x = torch.randint(0, 31, (2, 128))
    ref_out, ref_grads, _ = run(model, x, False, monkeypatch)
    out, grads, calls = run(model, x, True, monkeypatch, "carry")
    assert calls > 0
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for n, g in grads.items():
        if g is not None:
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


# ---- the whole model through mixer_cuda's fused route ------------------------------------------
def make(kind, bias=False):
    if kind == "lm":
        return MambaForCausalLM(MambaConfig(vocab_size=31, hidden_size=16, num_hidden_layers=2, state_size=4,
                                            time_step_rank=2, use_bias=bias))
    return VisionMamba(VimConfig(img_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_classes=3,
                                 drop_path_rate=0.0))


METHODS = {"lora_X": {"lora_X": {}}, "lora_out_proj": {"lora_out_proj": {}}, "affix": {"affix": {}},
           "additional_scan": {"additional_scan": {}}, "parallel_adapter": {"parallel_adapter": {}}, "full": None}


def build(kind, methods, bias=False):
    torch.manual_seed(0)
    model = make(kind, bias)
    if methods is None:
        return model.train()
    peft = get_peft_model(model, PeftConfig(methods))
    with torch.no_grad():
        for p in peft.method_of:
            p.add_(torch.randn_like(p) * 0.05)
    for m in peft.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return peft.train()


def run(model, x, fused, monkeypatch, affix_scan=None):
    calls = [0]
    if fused:   # send every mixer through mixer_cuda.forward, as on a GPU
        inner = mamba_inner.mamba_inner
        if affix_scan:
            monkeypatch.setenv("MAMBAPEFT_AFFIX_SCAN", affix_scan)
        if affix_scan == "cuda":
            install_scan_ext(monkeypatch)

        def counting(*a, **kw):
            calls[0] += 1
            if affix_scan in mamba_inner.PREFILL_MODES:
                assert kw.get("prefill") and kw["prefill"][0] == affix_scan, "the affix tokens were not a prefill"
            assert mamba_inner.is_flat(a[0]), f"xz reached the inner function with strides {a[0].stride()}"
            return inner(*a, **kw)
        monkeypatch.setattr(mamba_inner, "mamba_inner", counting)
        monkeypatch.setattr(MambaMixer, "forward", lambda self, h, mask=None, state=None:
                            mixer_cuda.forward(self, self.compose(), h, mask, state))
    model.zero_grad(set_to_none=True)
    with scan_backend("reference"):
        out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    monkeypatch.undo()
    install(monkeypatch)
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, calls[0]


@pytest.mark.parametrize("kind", ["lm", "vim"])
@pytest.mark.parametrize("method", list(METHODS) + ["affix_cuda"] + [pytest.param(f"affix_{scan}", marks=needs_triton)
                                                                     for scan in ("carry", "triton")])
def test_fused_route_equals_reference(kind, method, monkeypatch, request):
    scan = method[len("affix_"):] if method in ("affix_cuda", "affix_carry", "affix_triton") else None
    if scan and scan != "cuda":   # the affix tokens as a prefill (MAMBAPEFT_AFFIX_SCAN); else extra positions
        request.getfixturevalue("interpreted_triton")
    model = build(kind, METHODS["affix" if scan else method])
    x = torch.randint(0, 31, (2, 9)) if kind == "lm" else torch.randn(2, 3, 16, 16)
    ref_out, ref_grads, _ = run(model, x, False, monkeypatch)
    out, grads, calls = run(model, x, True, monkeypatch, scan or "mamba_ssm")
    assert calls > 0, "the fused route was not taken"
    assert_same(out, grads, ref_out, ref_grads)


def assert_same(out, grads, ref_out, ref_grads):
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for n, g in grads.items():
        r = ref_grads[n]
        assert (g is None) == (r is None), f"{n}: gradient on one path only"
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=n)
    assert any(g is not None for g in grads.values())


@pytest.mark.parametrize("scan", ["cuda", "mamba_ssm"])
@pytest.mark.parametrize("case", ["affix", "affix+lora_in_proj", "affix+trained_in_proj_with_bias"])
def test_lm_affix_tokens_are_written_into_xz(case, scan, monkeypatch):
    """On a unidirectional model in_proj leaves room in front of every sequence and the tokens are
    written there (xz is not copied into a longer buffer): the reference's output and gradients, with
    the tokens as a prefill or as extra positions, with in_proj's low-rank rows, and with in_proj's
    weight and bias trained (what in_proj made in the room was overwritten: none of its gradient may
    reach the bias, and the alignment columns must be zeros, not the bias)."""
    methods = {"affix": {}, "lora_in_proj": {}} if case == "affix+lora_in_proj" else {"affix": {}}
    model = build("lm", methods, bias=case.endswith("with_bias"))
    if case.endswith("with_bias"):
        for n, p in model.named_parameters():
            if "in_proj" in n:
                p.requires_grad_(True)
                assert n.endswith("bias") or n.endswith("weight"), n
    x = torch.randint(0, 31, (2, 9))
    ref_out, ref_grads, _ = run(model, x, False, monkeypatch)

    def copied(*a, **k):
        raise AssertionError("xz was copied into a prefixed buffer")
    monkeypatch.setattr(mixer_cuda, "_prefix_flat", copied)
    out, grads, calls = run(model, x, True, monkeypatch, scan)
    assert calls > 0, "the fused route was not taken"
    assert_same(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("kind", ["lm", "vim"])
@pytest.mark.parametrize("methods", [{"lora_X": {}}, {"lora_in_proj": {}}, {"lora_Z": {}},
                                     {"lora_X": {}, "additional_scan": {}, "parallel_adapter": {}},
                                     {"affix": {}, "lora_X": {}}], ids=lambda m: "+".join(m))
def test_recompute_z_equals_reference_and_keeps_only_the_x_half(kind, methods, monkeypatch):
    """set_recompute_z: the fused function keeps a copy of xz's x half and makes z again in backward
    (with the low-rank rows on z, and Vim's backward direction flipped): the same output and
    gradients as the reference, and E * b * L fewer saved values per call. Affix prefixes keep xz."""
    from mambapeft.models.mixer import set_recompute_z
    model = build(kind, methods)
    x = torch.randint(0, 31, (2, 9)) if kind == "lm" else torch.randn(2, 3, 16, 16)
    ref_out, ref_grads, _ = run(model, x, False, monkeypatch)

    def saved_and_fewer(on):
        set_recompute_z(model, on)
        saved, fewer = [0], [0]
        inner = mamba_inner.mamba_inner

        def recording(*a, **kw):
            if kw.get("z_fn") is not None:
                b, E2, L = a[0].shape
                fewer[0] += b * (E2 // 2) * L
            return inner(*a, **kw)
        monkeypatch.setattr(mamba_inner, "mamba_inner", recording)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.__setitem__(0, saved[0] + t.numel()) or t,
                                                      lambda t: t):
            out, grads, calls = run(model, x, True, monkeypatch, "mamba_ssm")
        assert calls > 0
        return out, grads, saved[0], fewer[0]

    _, _, kept, none_fewer = saved_and_fewer(False)
    out, grads, kept_z, fewer = saved_and_fewer(True)
    assert none_fewer == 0 and (fewer > 0) == ("affix" not in methods)
    assert kept - kept_z == fewer
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for n, g in grads.items():
        if g is not None:
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_the_trainer_sets_recompute_z_on_every_mixer(tmp_path):
    from test_training import TOY

    from mambapeft.training.toy import ToyTask
    from mambapeft.training.trainer import train
    task = ToyTask(TOY["task"])
    for on in (True, False, 1):
        model = task.load_model({})
        cfg = {**TOY, "output_dir": str(tmp_path / str(on)), "training": {**TOY["training"], "max_steps": 1,
                                                                          "eval_every": 0, "recompute_z": on}}
        train(cfg, task=task, model=model)
        mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
        want = [on is True or i < on for i in range(len(mixers))]
        assert len(mixers) > 1 and [m.recompute_z for m in mixers] == want


def test_a_failed_build_of_our_scan_falls_back(monkeypatch, caplog):
    """Where our CUDA scan cannot be built (no nvcc, say), it says why once and affix tokens take the
    next route; asking for it by name is a clear error."""
    from mambapeft.ops import scan_cuda_ext
    from mambapeft.ops.scan import triton_available

    def no_nvcc(*a, **k):
        raise OSError("CUDA_HOME environment variable is not set")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(scan_cuda_ext, "build", no_nvcc)
    for cached in (scan_cuda_ext.extension, scan_cuda_ext._build_error):
        cached.cache_clear()
    monkeypatch.delenv("MAMBAPEFT_AFFIX_SCAN", raising=False)
    try:
        with caplog.at_level("WARNING", logger="mambapeft"):
            assert not scan_cuda_ext.available() and not scan_cuda_ext.available()
        assert scan_cuda_ext.why_unavailable() == "OSError: CUDA_HOME environment variable is not set"
        assert sum("unavailable" in r.message for r in caplog.records) == 1   # said once
        assert mixer_cuda.affix_scan(None) == ("carry" if triton_available() else "mamba_ssm")
        monkeypatch.setenv("MAMBAPEFT_AFFIX_SCAN", "cuda")
        with pytest.raises(ValueError, match="MAMBAPEFT_AFFIX_SCAN=cuda: our CUDA scan did not build"):
            mixer_cuda.affix_scan(None)
    finally:
        for cached in (scan_cuda_ext.extension, scan_cuda_ext._build_error):
            cached.cache_clear()
