"""Adapters follow the base model: created on the device of the layer they attach to, in fp32 on a
half-precision base (cast at use), and every method trains, saves, loads and merges on bf16 and
fp16 base weights. The CUDA cases run on a GPU machine (`pytest -m gpu`)."""
import pytest
import torch
from test_peft import ALL_LM, ALL_VIM, make, perturb, run

from mambapeft.peft import PeftConfig, PeftModel, get_peft_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.gpu])]


def test_adapters_are_created_on_the_base_models_device():
    with torch.device("meta"):  # a device other than the CPU, available everywhere
        base = make("lm")
    peft = get_peft_model(base, PeftConfig({**ALL_LM, "lora_X": {"dora": True}}))
    wrong = [n for n, p in peft.base_model.named_parameters() if p.device.type != "meta"]
    assert not wrong, f"created off the model's device: {wrong[:5]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind,methods", [("lm", ALL_LM), ("vim", ALL_VIM), ("lm", {"full": {}}),
                                          ("lm", {"lora_in_proj": {"dora": True}, "lora_X": {}, "lora_embed": {}}),
                                          ("vim", {"lora_out_proj": {"dora": True}, "lora_embed": {"dora": True}})],
                         ids=["lm-all", "vim-all", "lm-full", "lm-dora", "vim-dora"])
def test_every_method_on_a_half_precision_base(kind, methods, dtype, device, tmp_path):
    torch.manual_seed(0)
    base = make(kind).to(device=device, dtype=dtype)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    x = make_inputs(kind, device, dtype)
    peft = get_peft_model(base, PeftConfig(methods))
    for n, p in peft.base_model.named_parameters():
        assert p.device == x.device, n
        assert p.dtype == (dtype if ".peft." not in n and not n.startswith("peft.") else torch.float32), n
    perturb(peft)
    peft.train()
    run(peft, x).float().pow(2).mean().backward()
    dead = [n for n, p in base.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, f"no gradient reaches {dead}"
    peft.eval()
    with torch.no_grad():
        tuned = run(peft, x).float()
    assert tuned.isfinite().all()

    peft.save_pretrained(tmp_path)
    fresh = make(kind).to(device=device, dtype=dtype)
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    for n, p in fresh.named_parameters():   # placed as get_peft_model places them
        assert p.device == x.device and p.dtype == base.get_parameter(n).dtype, n
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, x).float(), tuned, rtol=0, atol=0)
        merged = run(loaded.merge_and_unload(strict=False), x).float()
    # the merged weights are rounded to the base dtype once: an error of that rounding's size
    tol = 4 * torch.finfo(dtype).eps * tuned.abs().max().item()
    assert (merged - tuned).abs().max().item() <= tol


def make_inputs(kind, device, dtype):
    if kind == "lm":
        return torch.randint(0, 97, (2, 11), device=device)
    return torch.randn(2, 3, 32, 32, device=device, dtype=dtype)
