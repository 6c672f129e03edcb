"""The CUDA fast path (models/mixer_cuda.py on the mamba_ssm kernels) against the reference path.

For every method in METHODS (and all of them together, and DoRA), on the language model, on
FalconMamba (which never takes the fused mamba_inner_fn) and on Vim: outputs and the gradient of every trainable tensor on the kernels equal the readable
reference scan (`scan_backend("reference")`, same CUDA tensors), in fp32 (max error <= 1e-4 of the
tensor's largest value); under bf16 autocast, where both paths round matmul inputs and outputs to
bf16 in different places, the kernel path's error against the fp32 reference (in norm) is at most
twice the bf16 reference path's error plus 5e-2 of the tensor's norm. Decoding on CUDA equals the full forward, its
states equal the reference's and CPU-path and CUDA steps can alternate; padded batches equal
unpadded ones. Our fused inner function (ops/mamba_inner.py, the default fused route) equals mamba_ssm's
mamba_inner_fn (MAMBAPEFT_INNER=mamba_ssm) and the reference for the main methods on the LM and Vim,
and skips the weight-gradient GEMMs of frozen weights. Skipped without CUDA or the kernels (CI); run by
hand on a GPU machine.
"""
import copy

import pytest
import torch
from helpers import check_linear_cross_entropy, decode_stepwise
from test_peft import CASES, IDS, perturb

from mambapeft.models import MambaCache, MambaConfig, MambaForCausalLM, VimConfig, VisionMamba, cuda_graph
from mambapeft.ops.scan import scan_backend
from mambapeft.peft import PeftConfig, get_peft_model


def _kernels():
    if not torch.cuda.is_available():
        return False
    from mambapeft.models import mixer_cuda
    from mambapeft.ops import scan_cuda
    return scan_cuda.available() and mixer_cuda.available()


gpu = pytest.mark.skipif(not _kernels(), reason="needs CUDA and the mamba_ssm / causal_conv1d kernels")
FP32_TOL, BF16_TOL = 1e-4, 5e-2


@pytest.fixture(autouse=True)
def _exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make(kind):
    if kind in ("lm", "falcon"):   # falcon: FalconMamba's norms on dt, B and C
        return MambaForCausalLM(MambaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, state_size=16,
                                            time_step_rank=4, mixer_rms_eps=1e-6 if kind == "falcon" else None))
    return VisionMamba(VimConfig(img_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_classes=5,
                                 drop_path_rate=0.0))


def inputs(kind):
    return torch.randn(2, 3, 32, 32) if kind == "vim" else torch.randint(0, 97, (2, 11))


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def build(kind, methods):
    torch.manual_seed(0)
    peft = get_peft_model(make(kind), PeftConfig(methods))
    perturb(peft)                      # zero-initialised methods must change something
    no_dropout(peft)
    return peft.cuda().train(), inputs(kind).cuda()


def out_of(model, x, **kw):
    out = model(x, **kw)
    return out.logits if hasattr(out, "logits") else out


def forward_backward(peft, x, backend, autocast=False):
    peft.zero_grad(set_to_none=True)
    with scan_backend(backend), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        out = out_of(peft, x).float()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda()
    (out * weights).sum().backward()
    model = getattr(peft, "base_model", peft)      # a PeftModel, or a bare model trained in full
    grads = {n: p.grad.clone() if p.grad is not None else None
             for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def assert_close(a, b, tol, what):
    if a is None or b is None:
        assert (a is None or not a.any()) and (b is None or not b.any()), f"{what}: gradient on one path only"
        return
    a, b = a.float(), b.float()
    if tol >= BF16_TOL:   # bf16: relative error in the Frobenius norm (single entries round differently)
        err, scale = (a - b).norm().item(), b.norm().item()
    else:                 # fp32: the largest error against the largest value
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * scale + 1e-7, f"{what}: error {err:.3g} vs scale {scale:.3g} (tol {tol})"


def count_fused(monkeypatch):
    """Calls of the fused inner function, ours (ops/mamba_inner.py) or mamba_ssm's mamba_inner_fn."""
    from mambapeft.models import mixer_cuda
    from mambapeft.ops import mamba_inner
    calls = [0]

    def counting(fn):
        def wrapped(*a, **k):
            calls[0] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(mixer_cuda, "mamba_inner_fn", counting(mixer_cuda.mamba_inner_fn))
    monkeypatch.setattr(mamba_inner, "mamba_inner", counting(mamba_inner.mamba_inner))
    return calls


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,methods", CASES, ids=IDS)
def test_kernels_match_reference(kind, methods, autocast, monkeypatch):
    peft, x = build(kind, methods)
    ref_out, ref_grads = forward_backward(peft, x, "reference", autocast)
    calls = count_fused(monkeypatch)
    out, grads = forward_backward(peft, x, "auto", autocast)
    if kind == "falcon":   # mamba_inner_fn's own norms differ from FalconMamba's (see mixer_cuda.py)
        assert calls[0] == 0, "FalconMamba took the fused route"
    else:
        assert calls[0] > 0, "the fused route was not taken"
    assert grads.keys() == ref_grads.keys()
    if not autocast:
        assert_close(out, ref_out, FP32_TOL, "output")
        for n in grads:
            assert_close(grads[n], ref_grads[n], FP32_TOL, f"grad of {n}")
    else:  # as close to the fp32 truth as the reference path under bf16 is (or within BF16_TOL of it)
        monkeypatch.undo()
        true_out, true_grads = forward_backward(peft, x, "reference", False)
        for what, a, r, t in [("output", out, ref_out, true_out)] + [
                (f"grad of {n}", grads[n], ref_grads[n], true_grads[n]) for n in grads]:
            if t is None or not t.any():
                assert_close(a, r, BF16_TOL, what)
                continue
            err_k, err_r = (a.float() - t).norm().item(), (r.float() - t).norm().item()
            assert err_k <= 2 * err_r + BF16_TOL * t.norm().item(), \
                f"{what}: bf16 error {err_k:.3g} on the kernels vs {err_r:.3g} on the reference path"
    live = [n for n, g in grads.items() if g is not None and g.any()]
    assert live, "no trainable tensor got a gradient"


LM_CASES = [(k, m) for k, m in CASES if k != "vim"]
LM_IDS = [i for i, (k, _) in zip(IDS, CASES) if k != "vim"]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind,methods", LM_CASES, ids=LM_IDS)
def test_decoding_and_padding_on_kernels(kind, methods):
    peft, x = build(kind, methods)
    peft.eval()
    with torch.no_grad():
        full = out_of(peft, x)
        with scan_backend("reference"):
            ref = out_of(peft, x)
        assert_close(full, ref, FP32_TOL, "output")
        if methods.get("affix", {}).get("position") == "infix":  # tokens spread over the prefill only
            with scan_backend("reference"):
                ref_steps = decode_stepwise(peft, x, 5)
            assert_close(decode_stepwise(peft, x, 5), ref_steps, FP32_TOL, "decoding on CUDA")
        else:
            assert_close(decode_stepwise(peft, x, 3), full, FP32_TOL, "decoding on CUDA")
        mask = torch.ones_like(x)
        mask[1, :4] = 0
        padded = out_of(peft, x, attention_mask=mask)
        alone = out_of(peft, x[1:, 4:])
        assert_close(padded[1, 4:], alone[0], FP32_TOL, "padded row")
        assert_close(padded[0], full[0], FP32_TOL, "unpadded row of a padded batch")
        with scan_backend("reference"):
            ref_padded = out_of(peft, x, attention_mask=mask)
        assert_close(padded[1, 4:], ref_padded[1, 4:], FP32_TOL, "padded, against the reference")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lm", "falcon"])
def test_cuda_and_reference_decoding_steps_interoperate(kind):
    peft, x = build(kind, {"affix": {}, "additional_scan": {}, "lora_X": {}, "conv1d": {}})
    peft.eval()
    n_layers = len(peft.base_model.backbone.layers)
    with torch.no_grad():
        full = out_of(peft, x)
        caches = {"auto": MambaCache(n_layers), "reference": MambaCache(n_layers)}
        for backend, cache in caches.items():
            with scan_backend(backend):
                out_of(peft, x[:, :3], cache=cache)
        mixed, steps = MambaCache(n_layers), []
        with scan_backend("auto"):
            steps.append(out_of(peft, x[:, :3], cache=mixed))
        for t in range(3, x.shape[1]):
            for backend, cache in caches.items():
                with scan_backend(backend):
                    out_of(peft, x[:, t:t + 1], cache=cache)
            for a, b in zip(caches["auto"].layers, caches["reference"].layers):
                assert_close(a.conv[0], b.conv[0], FP32_TOL, f"conv state after step {t}")
                assert_close(a.ssm[0], b.ssm[0], FP32_TOL, f"ssm state after step {t}")
            with scan_backend("auto" if t % 2 else "reference"):
                steps.append(out_of(peft, x[:, t:t + 1], cache=mixed))
        assert_close(torch.cat(steps, 1), full, FP32_TOL, "alternating CUDA / reference steps")


@gpu
@pytest.mark.gpu
def test_falcon_on_kernels_equals_transformers(tmp_path):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.FalconMambaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, state_size=16,
                                         time_step_rank=4)
    hf = transformers.FalconMambaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    hf = hf.cuda()
    ours = MambaForCausalLM.from_pretrained(tmp_path).cuda().eval()
    x = inputs("falcon").cuda()
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = hf(x).logits
        assert_close(out_of(ours, x), expected, FP32_TOL, "logits")
        assert_close(out_of(ours, x, attention_mask=mask)[1, 4:], hf(x, attention_mask=mask).logits[1, 4:],
                     FP32_TOL, "padded logits")
        assert_close(decode_stepwise(ours, x, 3), expected, FP32_TOL, "decoding")


@gpu
@pytest.mark.gpu
def test_merged_model_generates_on_kernels_like_reference():
    peft, x = build("lm", {"lora_in_proj": {}, "lora_x_proj": {}, "D": {}})
    merged = peft.merge_and_unload().eval()
    gen = lambda **kw: merged.generate(x[:, :4], max_new_tokens=12, **kw)   # noqa: E731
    with torch.no_grad():
        fast = gen()                                                  # CUDA-graph steps
        eager = gen(use_cuda_graph=False)
        assert torch.equal(fast, eager)
        with scan_backend("reference"):
            slow = gen()
        assert torch.equal(fast, slow)
        # the captured step is kept: a second call replays it from its first step on
        (kept,) = cuda_graph._steps[merged].values()
        assert torch.equal(gen(), eager)
        assert list(cuda_graph._steps[merged].values()) == [kept]
        # weights changed in place are read afresh; a replaced weight or attribute captures again
        emb = merged.backbone.embeddings.weight                       # (tied to the LM head)
        emb.data.copy_(emb.data.roll(1, 0))
        changed = gen()
        assert not torch.equal(changed, eager) and torch.equal(changed, gen(use_cuda_graph=False))
        assert list(cuda_graph._steps[merged].values()) == [kept]
        mixer = merged.backbone.layers[0].mixer
        mixer.D = torch.nn.Parameter(mixer.D.detach() * 0.5)
        assert torch.equal(gen(), gen(use_cuda_graph=False))
        assert len(cuda_graph._steps[merged]) == 2 and list(cuda_graph._steps[merged].values())[0] is kept


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_loss_with_labels_on_kernels(autocast):
    peft, x = build("lm", {"lora_X": {}, "lora_out_proj": {}})
    labels = x.clone()
    labels[0, :3] = -100
    results = []
    for backend, return_logits in (("reference", True), ("auto", False)):
        peft.zero_grad(set_to_none=True)
        with scan_backend(backend), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = peft(x, labels=labels, return_logits=return_logits).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}))
    tol = BF16_TOL if autocast else FP32_TOL
    assert_close(results[1][0], results[0][0], tol, "loss")
    for n in results[0][1]:
        assert_close(results[1][1][n], results[0][1][n], tol, f"grad of {n}")


# ---- our fused inner function (ops/mamba_inner.py) against mamba_ssm's mamba_inner_fn ----------
INNER_METHODS = {"lora_X": {"lora_X": {}}, "lora_out_proj": {"lora_out_proj": {}}, "affix": {"affix": {}},
                 "additional_scan": {"additional_scan": {}}, "parallel_adapter": {"parallel_adapter": {}},
                 "full": None}


def build_or_full(kind, methods):
    if methods is not None:
        return build(kind, methods)
    torch.manual_seed(0)
    model = make(kind)
    no_dropout(model)
    return model.cuda().train(), inputs(kind).cuda()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", list(INNER_METHODS))
@pytest.mark.parametrize("kind", ["lm", "vim"])
def test_our_inner_matches_mamba_inner_fn_and_reference(kind, method, autocast, monkeypatch):
    from mambapeft.ops import mamba_inner
    model, x = build_or_full(kind, INNER_METHODS[method])
    ours_calls = [0]
    inner = mamba_inner.mamba_inner

    def counting(*a, **k):
        ours_calls[0] += 1
        return inner(*a, **k)
    monkeypatch.setattr(mamba_inner, "mamba_inner", counting)
    monkeypatch.setenv("MAMBAPEFT_INNER", "mamba_ssm")
    theirs_out, theirs = forward_backward(model, x, "auto", autocast)
    assert ours_calls[0] == 0
    monkeypatch.setenv("MAMBAPEFT_INNER", "ours")
    ours_out, ours = forward_backward(model, x, "auto", autocast)
    assert ours_calls[0] > 0, "our inner function was not called"
    true_out, truth = forward_backward(model, x, "reference", False)
    assert ours.keys() == theirs.keys() == truth.keys()
    pairs = [("output", ours_out, theirs_out, true_out)] + [
        (f"grad of {n}", ours[n], theirs[n], truth[n]) for n in ours]
    assert_as_close_as(pairs, autocast, "ours", "mamba_inner_fn")
    assert all(g is not None and g.any() for g in ours.values() if g is not None)
    assert any(g is not None and g.any() for g in ours.values()), "no trainable tensor got a gradient"


def assert_as_close_as(pairs, autocast, name, base):
    """pairs [(what, tensor, base's tensor, fp32 reference)]: in fp32 equal to both; under bf16 equal to
    base's where the reference is zero, else as close to the fp32 reference as base (or within BF16_TOL)."""
    for what, a, r, t in pairs:
        if not autocast:
            assert_close(a, r, FP32_TOL, f"{what} ({name} vs {base})")
            assert_close(a, t, FP32_TOL, f"{what} ({name} vs reference)")
        elif t is None or not t.any():
            assert_close(a, r, BF16_TOL, what)
        else:
            err_a, err_r = (a.float() - t).norm().item(), (r.float() - t).norm().item()
            assert err_a <= 2 * err_r + BF16_TOL * t.norm().item(), \
                f"{what}: bf16 error {err_a:.3g} with {name} vs {err_r:.3g} with {base}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["lm", "lm_1024", "vim"])
def test_affix_prefill_matches_extra_positions_and_reference(kind, autocast, monkeypatch):
    """Affix tokens through our fused inner function as a prefill, the sequence on our CUDA scan from the
    tokens' state (MAMBAPEFT_AFFIX_SCAN=cuda), on mamba_ssm's scan plus the carried state (=carry) or on
    the Triton scan (=triton) = as extra positions
    of mamba_ssm's scan (=mamba_ssm) = the reference scan. lm_1024: a sequence that fills the kernel's
    chunk, read with vector loads (the prefix is padded to keep its rows aligned)."""
    pytest.importorskip("triton")
    from mambapeft.ops import mamba_inner
    model, x = build(kind.split("_")[0], {"affix": {}})
    if kind == "lm_1024":
        x = torch.randint(0, 97, (2, 1024), generator=torch.Generator().manual_seed(0)).cuda()
    modes = []
    inner = mamba_inner.mamba_inner

    def recording(*a, **k):
        modes.append((k.get("prefill") or ("mamba_ssm",))[0])
        return inner(*a, **k)
    monkeypatch.setattr(mamba_inner, "mamba_inner", recording)
    monkeypatch.setenv("MAMBAPEFT_INNER", "ours")
    runs = {}
    for scan in ("mamba_ssm", "triton", "carry", "cuda"):
        monkeypatch.setenv("MAMBAPEFT_AFFIX_SCAN", scan)
        modes.clear()
        runs[scan] = forward_backward(model, x, "auto", autocast)
        assert modes and set(modes) == {scan}, (scan, modes)
    true_out, truth = forward_backward(model, x, "reference", False)
    e_out, extra = runs["mamba_ssm"]
    for scan in ("triton", "carry", "cuda"):
        p_out, prefill = runs[scan]
        assert prefill.keys() == extra.keys() == truth.keys()
        pairs = [("output", p_out, e_out, true_out)] + [(f"grad of {n}", prefill[n], extra[n], truth[n]) for n in truth]
        assert_as_close_as(pairs, autocast, f"prefill ({scan})", "extra positions")
        assert any(g is not None and g.any() for n, g in prefill.items() if "affix" in n), "no gradient to the tokens"


def _inner_tensors(frozen=()):
    g = torch.Generator().manual_seed(0)
    b, E, L, N, R, D, k = 2, 64, 37, 16, 4, 32, 4
    xz = torch.randn(2 * E, b * L, generator=g).view(2 * E, b, L).transpose(0, 1)   # mixer_cuda's layout
    w = dict(conv_w=torch.randn(E, k, generator=g) * 0.3, conv_b=torch.randn(E, generator=g) * 0.1,
             x_proj_w=torch.randn(R + 2 * N, E, generator=g) * 0.1, dt_w=torch.randn(E, R, generator=g) * 0.3,
             out_w=torch.randn(D, E, generator=g) * 0.1, out_b=torch.randn(D, generator=g) * 0.1,
             A=-torch.rand(E, N, generator=g) - 0.5, D=torch.randn(E, generator=g),
             dt_b=torch.randn(E, generator=g) - 3)
    xz = xz.cuda().requires_grad_()
    w = {n: t.cuda().requires_grad_(n not in frozen) for n, t in w.items()}
    return xz, w


@gpu
@pytest.mark.gpu
def test_our_inner_on_kernels_equals_mamba_inner_fn_and_skips_frozen_gemms():
    from torch.utils._python_dispatch import TorchDispatchMode

    from mambapeft.models.mixer_cuda import mamba_inner_fn
    from mambapeft.ops.mamba_inner import is_flat, mamba_inner

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.n += 1
            return func(*args, **(kwargs or {}))

    names = ["conv_w", "conv_b", "x_proj_w", "dt_w", "out_w", "out_b", "A", "D", "dt_b"]
    counts = {}
    for frozen in ((), tuple(names)):
        xz, w = _inner_tensors(frozen)
        out = mamba_inner(xz, *w.values())
        dout = torch.randn_like(out)
        with CountMatmuls() as c:
            out.backward(dout)
        counts[len(frozen)] = c.n
        assert is_flat(xz.grad)
        for n in names:
            assert (w[n].grad is None) == (n in frozen), n
        if not frozen:
            xz2, w2 = _inner_tensors()
            # the bias added outside: mamba_inner_fn returns an empty gradient for a given out_proj bias
            ref = mamba_inner_fn(xz2.contiguous(), w2["conv_w"][:, None], w2["conv_b"], w2["x_proj_w"], w2["dt_w"],
                                 w2["out_w"], None, w2["A"], None, None, w2["D"], delta_bias=w2["dt_b"],
                                 delta_softplus=True) + w2["out_b"]
            ref.backward(dout)
            assert_close(out, ref, FP32_TOL, "output")
            assert_close(xz.grad, xz2.grad, FP32_TOL, "grad of xz")
            for n in names:
                assert_close(w[n].grad, w2[n].grad, FP32_TOL, f"grad of {n}")
    assert counts[len(names)] == counts[0] - 3, counts   # out_proj, x_proj and dt_proj weight GEMMs skipped


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("tie", [True, False])
def test_chunked_cross_entropy_equals_full_logits(device, tie, monkeypatch):
    check_linear_cross_entropy(device, tie, monkeypatch)   # on CUDA through the Triton kernel where triton is


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,methods", [("lm", {"lora_X": {}}), ("lm", {"lora_in_proj": {}, "lora_Z": {}}),
                                          ("vim", {"lora_X": {}, "parallel_adapter": {}})],
                         ids=["lm-lora_X", "lm-lora_in_proj+lora_Z", "vim-lora_X+parallel_adapter"])
def test_recompute_z_on_kernels_matches_keeping_it_and_reference(kind, methods, autocast, monkeypatch):
    """training.recompute_z on our fused function: z made again in backward gives the output of keeping
    it and gradients as close to the fp32 reference as keeping it does."""
    from mambapeft.models.mixer import set_recompute_z
    monkeypatch.setenv("MAMBAPEFT_INNER", "ours")
    model, x = build(kind, methods)
    kept_out, kept = forward_backward(model, x, "auto", autocast)
    set_recompute_z(model, True)
    out, remade = forward_backward(model, x, "auto", autocast)
    true_out, truth = forward_backward(model, x, "reference", False)
    assert torch.equal(out, kept_out)                  # the forward is untouched
    assert remade.keys() == kept.keys() == truth.keys()
    assert_as_close_as([(f"grad of {n}", remade[n], kept[n], truth[n]) for n in truth], autocast, "recompute_z",
                       "keeping z")


def _run_on(model, x, device):
    """A copy of `model` on `device`: its training loss (bf16 autocast) and gradients, its evaluation
    logits (the norms' kernel for no gradient) and greedy generate() (the captured decoding step)."""
    m = copy.deepcopy(model).to(device).train()
    ids = x.to(device)
    with torch.autocast("cuda", torch.bfloat16):
        loss = m(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in m.named_parameters() if p.requires_grad}
    m.eval()
    with torch.no_grad():
        logits = m(ids).logits.float().cpu()
    tokens = m.generate(ids[:, :4], max_new_tokens=12, eos_token_id=-1).cpu()
    return loss.item(), grads, logits, tokens


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("affix_scan", ["cuda", "carry", "triton"])
@pytest.mark.filterwarnings("error:The CUDA Graph is empty")
def test_a_model_on_the_second_gpu_equals_one_on_the_first(affix_scan, monkeypatch):
    """A model moved to cuda:1 in a process whose current device stays cuda:0 (as in a notebook): every
    kernel must run on its tensors' device (Triton launches on the current one unless told: ops.device_of;
    a captured decoding step belongs to the device it was captured on, and is captured on its streams: an
    empty capture, which replays nothing, is an error here, as greedy tokens of a tiny model may repeat
    anyway). Training loss and gradients, the evaluation forward and generate() equal the same model's on
    cuda:0; the current device is untouched."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MAMBAPEFT_AFFIX_SCAN", affix_scan)
    torch.cuda.set_device(0)
    model, x = build("lm", {"lora_X": {}, "additional_scan": {}, "affix": {}})
    x = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))
    first = _run_on(model, x, "cuda:0")
    second = _run_on(model, x, "cuda:1")
    assert torch.cuda.current_device() == 0
    assert abs(first[0] - second[0]) <= 1e-4 * abs(first[0])
    assert first[1].keys() == second[1].keys()
    for n, g in first[1].items():   # the backward's atomics sum in any order: bf16 roundings may differ
        assert (second[1][n] - g).norm() <= 1e-2 * g.norm() + 1e-7, f"grad of {n}"
    torch.testing.assert_close(second[2], first[2], rtol=0, atol=1e-4)
    assert torch.equal(second[3], first[3])
