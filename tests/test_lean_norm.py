"""The memory-efficient RMSNorm (models/norm.py, training.memory_efficient_norm).

Under bf16 autocast it gives the very forward the default norm gives (its bf16 output is what each
consuming linear's autocast cast makes of the default's fp32 output), so the loss is equal bit for
bit; it keeps its output instead of the fp32 residual stream for its backward. Its gradients differ
from the default ones by bf16 rounding only: x_hat is recovered from the bf16-rounded output
(relative error up to 2^-9 a value) and the consumers' gradients arrive summed in bf16. Through the
bf16 layers below a norm that becomes up to 1.4% of a tensor's largest gradient on these tiny models
with torch 2.13's CPU kernels and 3.0% with torch 2.11's (the GPU machine's; the bound is 4%), while
bf16 autocast itself moves the default gradients 0.4-47% from fp32; the lean gradients are no further
from fp32 than the default bf16 ones (within 25%). With an fp32 output the formula is the default's up
to fp32 rounding (2e-6 of a tensor's largest gradient)."""
import pytest
import torch
import torch.nn.functional as F
from test_frozen import CASES, build
from test_gpu import build as gpu_build
from test_gpu import gpu
from test_training import TOY, losses

from mambapeft.models.norm import RMSNorm, memory_efficient_norm
from mambapeft.peft.config import ConfigError
from mambapeft.training.config import validate
from mambapeft.training.toy import ToyTask
from mambapeft.training.trainer import train

BF16 = torch.bfloat16


def run(peft, kind, autocast, device="cpu"):
    """-> (loss, the backbone's final hidden state in the consumers' dtype, {name: gradient})."""
    peft.zero_grad(set_to_none=True)
    torch.manual_seed(1)   # the same dropout masks in every run
    model = peft.base_model
    with torch.autocast(device, BF16, enabled=autocast):
        if kind == "vim":
            images = torch.randn(2, 3, 32, 32, device=device)
            hidden = model.forward_features(images)
            loss = peft(images).pow(2).mean()
        else:
            ids = torch.randint(0, 97, (2, 11), device=device)
            hidden = model.backbone(ids)
            loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    hidden = hidden.detach().to(BF16 if autocast else torch.float32)
    return loss.detach(), hidden, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def worst(grads, ref):
    """The largest error of a gradient, relative to the reference tensor's largest value."""
    return max(((grads[k] - g).abs().max() / g.abs().max()).item() for k, g in ref.items())


@pytest.mark.parametrize("kind,methods", CASES, ids=[f"{k}-{'+'.join(m) if len(m) < 4 else 'all'}" for k, m in CASES])
def test_same_forward_and_loss_under_bf16_autocast_and_gradients_within_bf16_rounding(kind, methods):
    peft = build(kind, methods, False)[0]
    _, _, fp32 = run(peft, kind, False)
    loss, hidden, grads = run(peft, kind, True)
    assert memory_efficient_norm(peft, BF16) == len(peft.base_model.layers if kind == "vim" else
                                                    peft.base_model.backbone.layers) + 1   # blocks and norm_f
    loss2, hidden2, grads2 = run(peft, kind, True)
    assert torch.equal(loss, loss2) and torch.equal(hidden, hidden2)
    assert grads.keys() == grads2.keys()
    for name, g in grads.items():
        assert grads2[name].dtype == g.dtype and grads2[name].abs().max() > 0, name
        err = ((grads2[name] - g).abs().max() / g.abs().max()).item()
        assert err <= 4e-2, f"{name}: {err:.3g} of its largest value"
    assert worst(grads2, fp32) <= 1.25 * worst(grads, fp32)


@pytest.mark.parametrize("kind,methods", [c for c in CASES if len(c[1]) > 3] + [("lm", {"lora_X": {}, "affix": {}})])
def test_with_an_fp32_output_the_backward_is_the_default_formula(kind, methods):
    peft = build(kind, methods, False)[0]
    loss, hidden, grads = run(peft, kind, False)
    memory_efficient_norm(peft, torch.float32)   # the lean path without autocast: no rounding of the output
    loss2, hidden2, grads2 = run(peft, kind, False)
    assert torch.equal(loss, loss2) and torch.equal(hidden, hidden2)
    assert worst(grads2, grads) <= 2e-6


def norm_pair(d=64):
    """The same random-weight norm twice: the default and the lean one (fp32 output)."""
    torch.manual_seed(0)
    a = RMSNorm(d)
    with torch.no_grad():
        a.weight.copy_(torch.randn(d))
    b = RMSNorm(d)
    b.load_state_dict(a.state_dict())
    return a, b


def norm_grads(norm, x, dy):
    x = x.clone().requires_grad_(True)
    norm.weight.grad = None
    y = norm(x)
    y.float().backward(dy)
    return y, x.grad, norm.weight.grad


def test_one_norm_in_fp32_equals_autograd_of_the_default():
    default, lean = norm_pair()
    lean.output_dtype = torch.float32
    x, dy = torch.randn(3, 5, 64) * 3, torch.randn(3, 5, 64)
    y, dx, dw = norm_grads(default, x, dy)
    y2, dx2, dw2 = norm_grads(lean, x, dy)
    assert type(y2.grad_fn).__name__ == "_LeanRMSNormBackward" and torch.equal(y, y2)
    torch.testing.assert_close(dx2, dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw2, dw, rtol=1e-5, atol=1e-6)


def test_a_weight_with_an_exact_zero_takes_the_default_path_and_gets_the_exact_gradient(monkeypatch):
    default, lean = norm_pair()
    with torch.no_grad():
        default.weight[5] = lean.weight[5] = 0.0
    lean.output_dtype = BF16
    x, w = torch.randn(2, 7, 64) * 3, torch.randn(48, 64)

    def grads(norm):   # a consuming linear under autocast, as in the blocks
        xx = x.clone().requires_grad_(True)
        norm.weight.grad = None
        with torch.autocast("cpu", BF16):
            F.linear(norm(xx), w).float().pow(2).sum().backward()
        return xx.grad, norm.weight.grad

    dx, dw = grads(default)
    dx2, dw2 = grads(lean)
    assert torch.equal(dx, dx2) and torch.equal(dw, dw2)
    assert lean._zero_check[1] is True
    # without the fallback, x_hat = y / w is 0/0 in that column
    monkeypatch.setattr(RMSNorm, "_weight_has_zero", lambda self: False)
    assert not torch.isfinite(grads(lean)[0]).all()


def test_the_zero_check_is_asked_once_per_weight_version():
    _, lean = norm_pair()
    lean.output_dtype = torch.float32
    x = torch.randn(2, 3, 64, requires_grad=True)
    lean(x)
    first = lean._zero_check
    lean(x)
    assert lean._zero_check is first   # not asked again
    with torch.no_grad():
        lean.weight[0] = 0.0           # an in-place edit (an optimizer step) bumps the version
    assert type(lean(x).grad_fn).__name__ != "_LeanRMSNormBackward" and lean._zero_check[1] is True
    with torch.no_grad():
        lean.weight[0] = 1.0
    assert type(lean(x).grad_fn).__name__ == "_LeanRMSNormBackward"


def test_without_a_gradient_or_without_autocast_to_its_dtype_the_norm_is_the_default():
    default, lean = norm_pair()
    lean.output_dtype = BF16
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = default(x)
    for out in (lean(x), torch.no_grad()(lean)(x)):   # bf16 without bf16 autocast: fp32 consumers
        assert out.dtype == torch.float32 and torch.equal(out, y)
    with torch.autocast("cpu", BF16):
        assert lean(x).dtype == BF16 and torch.equal(lean(x), y.to(BF16))


def saved_bytes(module, *args):
    """Bytes of the distinct storages autograd keeps for the backward of module(*args)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(args[0].device.type, BF16):
        module(*args)
    return sum(seen.values())


@pytest.mark.parametrize("methods,kept", [({"lora_X": {"r": 4}}, 0), ({"affix": {}}, 2)])
def test_a_block_no_longer_keeps_the_fp32_residual(methods, kept):
    """LoRA_p(X)'s down projection keeps the bf16 normalised input anyway: the lean norm keeps that
    same storage, so the block keeps the residual's 4 bytes a value less. A method that keeps no such
    copy: the norm's bf16 output (2 bytes a value) is new, 2 less."""
    peft = build("lm", methods, False)[0]
    block = peft.base_model.backbone.layers[0]
    h = torch.randn(2, 64, 32, requires_grad=True)   # the fp32 residual stream entering the block
    before = saved_bytes(block, h)
    peft.memory_efficient_norm(BF16)
    after = saved_bytes(block, h)
    assert before - after == h.numel() * (4 - kept)


def toy_run(tmp_path, name, lean, precision="bf16", steps=2, device="auto"):
    task_section = {**TOY["task"], "validation": 8, "test": 8}
    task = ToyTask(task_section)
    model = task.load_model({})
    cfg = {**TOY, "task": task_section, "methods": {"lora_X": {"r": 4}, "affix": {}}, "output_dir": str(tmp_path / name),
           "training": {**TOY["training"], "max_steps": steps, "eval_every": 0, "precision": precision,
                        "memory_efficient_norm": lean, "device": device}}
    train(cfg, task=task, model=model)
    return losses(tmp_path / name), model


def test_the_trainer_sets_every_norm_and_the_first_loss_is_the_same(tmp_path):
    default, _ = toy_run(tmp_path, "default", False)
    lean, model = toy_run(tmp_path, "lean", True)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.output_dtype == BF16 for m in norms)
    assert lean[0] == default[0]                     # the same forward
    assert lean[1:] != default[1:]                   # the lean path did run
    assert all(abs(a - b) <= 0.05 * abs(b) for a, b in zip(lean, default))   # within bf16 rounding


def test_memory_efficient_norm_without_bf16_autocast_is_a_one_line_error(tmp_path):
    cfg = {**TOY, "output_dir": str(tmp_path / "x"), "training": {"precision": "fp32", "memory_efficient_norm": True}}
    with pytest.raises(ConfigError, match=r"^c\.yaml: training\.memory_efficient_norm: expected false with "
                                          r"precision fp32 \(it needs bf16 autocast\)$"):
        validate(cfg, "c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: training\.memory_efficient_norm: expected true or false$"):
        validate({**cfg, "training": {"memory_efficient_norm": "yes"}}, "c.yaml")
    with pytest.raises(ConfigError) as e:   # auto on the CPU runs in fp32 (also where CUDA is there)
        toy_run(tmp_path, "auto", True, precision="auto", device="cpu")
    assert str(e.value) == ("training.memory_efficient_norm: needs bf16 autocast, and precision auto on cpu runs "
                            "in fp32; expected false")


GPU_CASES = [("lm", {"lora_X": {"r": 4}}), ("lm", {"affix": {}, "additional_scan": {}}),
             ("lm", {"lora_out_proj": {}, "parallel_adapter": {}}), ("vim", {"lora_in_proj": {}, "affix": {}})]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind,methods", GPU_CASES, ids=["+".join(m) for _, m in GPU_CASES])
def test_on_the_kernels_the_same_loss_and_gradients_within_bf16_rounding(kind, methods):
    """The fused path reads the bf16 output as it read autocast's cast of the fp32 one: the same loss
    bit for bit (the forward kernels are deterministic); gradients as on the CPU, against a second
    default run's to allow for the kernels' atomic adds."""
    peft = gpu_build(kind, methods)[0]
    _, _, grads = run(peft, kind, True, "cuda")
    loss, hidden, again = run(peft, kind, True, "cuda")
    peft.memory_efficient_norm(BF16)
    loss2, hidden2, grads2 = run(peft, kind, True, "cuda")
    assert torch.equal(loss, loss2) and torch.equal(hidden, hidden2)
    for name, g in grads.items():
        err = ((grads2[name] - g).abs().max() / g.abs().max()).item()
        noise = ((again[name] - g).abs().max() / g.abs().max()).item()
        assert err <= 2e-2 + 2 * noise, f"{name}: {err:.3g} of its largest value"
    if kind == "lm":
        block = peft.base_model.backbone.layers[0]
        h = torch.randn(2, 64, 64, device="cuda", requires_grad=True)
        peft.memory_efficient_norm(None)
        before = saved_bytes(block, h)
        peft.memory_efficient_norm(BF16)
        assert before - saved_bytes(block, h) >= h.numel() * 2
