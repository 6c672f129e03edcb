"""cast_frozen (peft/frozen.py): frozen matmul weights stored in bf16 give, under bf16 autocast, the
very loss and gradients that fp32 weights give (autocast casts them to the same bf16 values)."""
import pytest
import torch
from helpers import tiny_falcon, tiny_lm
from test_gpu import gpu
from test_gpu import make as gpu_model
from test_peft import ALL_LM, ALL_VIM, tiny_vim
from test_training import TOY, losses

from mambapeft.peft import PeftConfig, get_peft_model
from mambapeft.peft.inject import mixers
from mambapeft.training.toy import ToyTask
from mambapeft.training.trainer import train

BF16 = torch.bfloat16
CASES = [("lm", {"lora_X": {"r": 4}}), ("lm", {"lora_in_proj": {}}), ("lm", {"lora_x_proj": {}}),
         ("lm", {"additional_scan": {}}), ("lm", {"affix": {}}), ("lm", {"affix": {"position": "outer"}}),
         ("lm", {"lora_out_proj": {}, "parallel_adapter": {}}), ("lm", {"lora_dt": {"dora": True}}),
         ("lm", {"lora_X": {"dora": True}}), ("lm", ALL_LM), ("falcon", {"lora_X": {}, "additional_scan": {}}),
         ("vim", {"lora_in_proj": {}}), ("vim", {"additional_scan": {}, "affix": {}}), ("vim", ALL_VIM)]


def build(kind, methods, cast, device="cpu"):
    torch.manual_seed(0)
    if device == "cuda":   # test_gpu's widths, which the kernels take
        model = gpu_model(kind)
    else:
        model = tiny_lm() if kind == "lm" else tiny_falcon() if kind == "falcon" else tiny_vim()
    peft = get_peft_model(model.to(device), PeftConfig(methods)).train()
    with torch.no_grad():   # off the initial values (zero up-projections would hide a wrong delta)
        for p in peft.method_of:
            p.add_(torch.randn_like(p) * 0.05)
    return peft, peft.cast_frozen(BF16) if cast else 0


def loss_and_grads(peft, kind, device="cpu"):
    peft.zero_grad(set_to_none=True)
    torch.manual_seed(1)   # the same dropout masks in both runs
    with torch.autocast(device, BF16):
        if kind == "vim":
            loss = peft(torch.randn(2, 3, 32, 32, device=device)).pow(2).mean()
        else:
            ids = torch.randint(0, 97, (2, 11), device=device)
            loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft.base_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,methods", CASES, ids=[f"{k}-{'+'.join(m) if len(m) < 4 else 'all'}" for k, m in CASES])
def test_bf16_frozen_weights_give_the_same_loss_and_gradients_bit_for_bit(kind, methods):
    loss, grads = loss_and_grads(build(kind, methods, False)[0], kind)
    peft, n = build(kind, methods, True)
    assert n > 0
    loss2, grads2 = loss_and_grads(peft, kind)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys()
    for name, g in grads.items():
        assert g is not None and grads2[name].dtype == torch.float32
        assert torch.equal(g, grads2[name]), name


GPU_CASES = [("lm", {"lora_X": {"r": 4}}), ("lm", {"lora_x_proj": {}, "additional_scan": {}}), ("lm", {"affix": {}}),
             ("lm", {"lora_out_proj": {}, "parallel_adapter": {}}), ("vim", {"lora_in_proj": {}, "affix": {}})]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("inner", ["ours", "mamba_ssm"])
@pytest.mark.parametrize("kind,methods", GPU_CASES, ids=["+".join(m) for _, m in GPU_CASES])
def test_on_the_kernels_bf16_frozen_weights_give_the_same_loss_and_gradients(kind, methods, inner, monkeypatch):
    """The fused inner functions cast weights to xz's dtype themselves: a bf16 weight is that cast.
    The loss is the same bit for bit. Gradients are not deterministic on the kernels: the scan's
    backward adds dB and dC over channel blocks (and dA, dD, the dt bias's gradient over the batch)
    with atomic adds in an order that depends on timing, and a bf16 rounding downstream can turn that
    into a difference in a few elements. Two runs of one model can happen to agree exactly while the
    cast model (different timing: no casts) orders its adds differently: on the H200 a LoRA x_proj
    gradient moved by 3.6e-4 of its largest value that way, with the same code before and after the
    cast (bench/results/issue13/s3_final/gpu_frozen_repeat.txt). Such flips are rare: in the fourteenth
    session one run of the cast model in this test moved a LoRA gradient by 2.6e-3 of its largest value,
    and nine more runs of either model then agreed bit for bit (bench/results/issue13/s14/). So in the
    best of three runs the cast may move a gradient no further than 2x a second fp32 run moves it plus
    2^-9 of its largest value: a cast that changed the arithmetic (a bf16-rounded sum) would move it by
    about 2^-8 relative in every run, and the loss, compared bit for bit, would move too."""
    monkeypatch.setenv("MAMBAPEFT_INNER", inner)
    model = build(kind, methods, False, "cuda")[0]
    loss, grads = loss_and_grads(model, kind, "cuda")
    _, again = loss_and_grads(model, kind, "cuda")
    cast = build(kind, methods, True, "cuda")[0]
    runs = [loss_and_grads(cast, kind, "cuda") for _ in range(3)]
    assert all(torch.equal(loss, loss2) for loss2, _ in runs)
    for name, g in grads.items():
        noise = (again[name] - g).abs().max().item()
        err = min((grads2[name] - g).abs().max().item() for _, grads2 in runs)
        assert err <= 2 * noise + 2 ** -9 * g.abs().max().item(), f"{name}: {err:.3g} off, run-to-run {noise:.3g}"


def test_a_weight_a_method_adds_to_stays_fp32_and_casting_it_anyway_would_change_the_loss(monkeypatch):
    peft, _ = build("lm", {"lora_x_proj": {}, "lora_dt": {"dora": True}}, True)
    for m in mixers(peft.base_model):
        assert (m.in_proj.weight.dtype, m.out_proj.weight.dtype) == (BF16, BF16)
        assert (m.x_proj.weight.dtype, m.dt_proj.weight.dtype) == (torch.float32, torch.float32)
    # the exclusion is needed: the bf16 sum of a rounded weight differs from the rounded fp32 sum
    from mambapeft.models.mixer import MixerAdapter
    monkeypatch.setattr(MixerAdapter, "edited_weights", lambda self, mixer: [])
    loss = loss_and_grads(build("lm", {"lora_x_proj": {}}, False)[0], "lm")[0]
    assert not torch.equal(loss, loss_and_grads(build("lm", {"lora_x_proj": {}}, True)[0], "lm")[0])


@pytest.mark.parametrize("kind,methods", [("lm", {"lora_X": {}}), ("vim", {"head": {}}), ("vim", {"lora_X": {}})])
def test_only_frozen_mixer_matmul_weights_are_converted(kind, methods):
    peft, n = build(kind, methods, True)
    model = peft.base_model
    cast = {id(w) for m in mixers(model) for w in m.matmul_weights()}
    assert n == sum(p.numel() for p in model.parameters() if id(p) in cast)
    for name, p in model.named_parameters():   # A_log, D, conv1d, dt bias, norms, embeddings, heads, adapters
        assert p.dtype == (BF16 if id(p) in cast else torch.float32), name
    assert any(".x_proj_b." in k for k, p in model.named_parameters() if p.dtype == BF16) == (kind == "vim")
    assert peft.cast_frozen(BF16) == 0   # already done


def test_full_fine_tuning_converts_nothing():
    peft, n = build("lm", {"full": {}}, True)
    assert n == 0 and all(p.dtype == torch.float32 for p in peft.parameters())


def test_merge_and_unload_on_bf16_frozen_weights_folds_into_bf16():
    peft, _ = build("lm", {"lora_X": {}, "lora_x_proj": {}}, True)
    peft.eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad(), torch.autocast("cpu", BF16):
        before = peft(ids).logits.float()
        merged = peft.merge_and_unload()
        after = merged(ids).logits.float()
    m = mixers(merged)[0]
    assert (m.in_proj.weight.dtype, m.x_proj.weight.dtype) == (BF16, torch.float32)
    assert not any(m.peft for m in mixers(merged))
    torch.testing.assert_close(after, before, rtol=0.05, atol=0.05)   # the merged rows are rounded to bf16


def run_toy(tmp_path, frozen, methods, steps=3):
    task = ToyTask(TOY["task"])
    model = task.load_model({})
    cfg = {**TOY, "methods": methods, "output_dir": str(tmp_path / frozen),
           "training": {**TOY["training"], "max_steps": steps, "eval_every": 0, "precision": "bf16",
                        "frozen_dtype": frozen}}
    result = train(cfg, task=task, model=model)
    return losses(tmp_path / frozen), result, mixers(model)[0].in_proj.weight.dtype


@pytest.mark.parametrize("methods", [{"lora_X": {"r": 4}}, {"lora_x_proj": {"r": 4}, "additional_scan": {}}])
def test_the_trainer_gives_the_same_losses_with_bf16_frozen_weights(tmp_path, methods):
    fp32, r32, d32 = run_toy(tmp_path, "fp32", methods)
    bf16, r16, d16 = run_toy(tmp_path, "auto", methods)   # auto: bf16 under bf16 autocast
    assert (d32, d16) == (torch.float32, BF16)
    assert len(fp32) == 3 and fp32 == bf16
    assert r32["test"] == r16["test"]


def test_restoring_a_search_base_model_undoes_the_bf16_weights():
    from mambapeft.search.base import BaseModel
    model = tiny_lm()
    base = BaseModel(model)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    get_peft_model(model, PeftConfig({"lora_X": {}})).cast_frozen(BF16)
    restored = base.restore()
    assert all(p.dtype == torch.float32 for p in restored.parameters())
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, before)
