"""Every method, and all of them together, on the language model and on Vim."""
import pytest
import torch
from helpers import check_left_padded_generation, decode_stepwise, tiny_falcon, tiny_lm

from mambapeft.io import CheckpointError
from mambapeft.models import VimConfig, VisionMamba
from mambapeft.peft import METHODS, ConfigError, PeftConfig, PeftModel, get_peft_model, preset

LM_METHODS = [n for n, s in METHODS.items() if "lm" in s.models and n != "head"]
VIM_METHODS = [n for n, s in METHODS.items() if "vim" in s.models]
ZERO_INIT = {"lora_in_proj", "lora_out_proj", "lora_x_proj", "lora_dt", "lora_embed", "lora_X", "lora_Z",
             "lora_d", "lora_B", "lora_C", "A", "D", "conv1d", "bias", "cls", "pos", "parallel_adapter", "full",
             "head"}
ALL_LM = {n: {} for n in LM_METHODS if n != "full"}
ALL_VIM = {n: {} for n in VIM_METHODS if n != "full"}
CASES = [("lm", {n: {}}) for n in LM_METHODS] + [("vim", {n: {}}) for n in VIM_METHODS] + [
    ("lm", ALL_LM), ("vim", ALL_VIM), ("lm", {"lora_X": {"dora": True}, "lora_x_proj": {"dora": True},
                                              "lora_out_proj": {"dora": True}}),
    ("vim", {"lora_dt": {"dora": True}, "lora_in_proj": {"dora": True}, "lora_embed": {"dora": True}}),
    ("lm", {"lora_embed": {"dora": True}, "lora_C": {"dora": True}}),
    ("lm", {"affix": {"projection": True, "hidden": 16}, "prompt": {"projection": True, "tokens": 2}}),
    ("lm", {"affix": {"position": "outer", "tokens": 2}, "additional_scan": {"position": "suffix", "init": "s4d"}}),
    ("vim", {"affix": {"dual": False, "store_z": True}, "prompt": {"tokens": 3}}),
    ("lm", {"affix": {"position": "infix", "tokens": 2}}), ("vim", {"affix": {"position": "infix"}})] + [
    ("falcon", {n: {}}) for n in LM_METHODS] + [  # FalconMamba: the norms on dt, B and C in every path
    ("falcon", ALL_LM), ("falcon", {"lora_B": {"dora": True}, "lora_d": {}, "additional_scan": {"position": "suffix"}})]
IDS = [f"{k}-{'all' if len(m) > 6 else '+'.join(m)}" for k, m in CASES]


def tiny_vim():
    return VisionMamba(VimConfig(img_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_classes=5, drop_path_rate=0.0)).eval()


def make(kind):
    return tiny_lm() if kind == "lm" else tiny_falcon() if kind == "falcon" else tiny_vim()


def inputs(kind):
    return torch.randn(2, 3, 32, 32) if kind == "vim" else torch.randint(0, 97, (2, 11))


def run(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def perturb(peft):
    """Move every trainable tensor off its initial value, as training would."""
    with torch.no_grad():
        for p in peft.method_of:
            p.add_(torch.randn_like(p) * 0.05)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind,methods", CASES, ids=IDS)
def test_method_life_cycle(kind, methods, tmp_path):
    base = make(kind)
    x = inputs(kind)
    base_state = snapshot(base)
    with torch.no_grad():
        before = run(base, x)
    peft = get_peft_model(base, PeftConfig(methods))

    # only the intended tensors train
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable
    for n in trainable:
        if "full" in methods:
            continue
        ok = ".peft." in n or n.startswith("peft.") or ("head" in methods and n.startswith("head."))
        assert ok, f"{n} trains but belongs to no method"
    for n, p in base.named_parameters():
        if ".peft." not in n and not n.startswith("peft.") and "full" not in methods:
            assert not p.requires_grad or ("head" in methods and n.startswith("head.")), n

    # zero-initialised methods leave the function unchanged
    if set(methods) <= ZERO_INIT:
        with torch.no_grad():
            torch.testing.assert_close(run(peft, x), before, rtol=1e-5, atol=1e-5)

    # every trainable tensor receives a gradient
    perturb(peft)
    out = run(peft, x)
    out.float().pow(2).mean().backward()
    dead = {n for n, p in base.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    z_half = {n for n in dead if methods.get("affix", {}).get("store_z")}
    assert dead == z_half, f"no gradient reaches {sorted(dead)}"
    with torch.no_grad():
        tuned = run(peft, x)

    # save, then load onto a fresh copy of the base model: the same outputs exactly
    peft.save_pretrained(tmp_path)
    fresh = make(kind)
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    fresh_state = fresh.state_dict()
    assert base.state_dict().keys() == fresh_state.keys()
    for n, a in base.state_dict().items():
        assert torch.equal(a, fresh_state[n]), n
    with torch.no_grad():  # equal weights; BLAS may still round differently at another address
        torch.testing.assert_close(run(loaded, x), tuned, rtol=1e-6, atol=1e-6)

    # decoding and padding with the method (language model)
    if kind != "vim":
        with torch.no_grad():
            if methods.get("affix", {}).get("position") == "infix":  # tokens spread over the prefill only
                torch.testing.assert_close(decode_stepwise(peft, x, 5)[:, :5], run(peft, x[:, :5]),
                                           rtol=1e-4, atol=1e-4)
            else:
                torch.testing.assert_close(decode_stepwise(peft, x, 3), tuned, rtol=1e-4, atol=1e-4)
            mask = torch.ones_like(x)
            mask[1, :4] = 0
            padded = peft(x, mask).logits
            alone = peft(x[1:, 4:]).logits
            torch.testing.assert_close(padded[1, 4:], alone[0], rtol=1e-4, atol=1e-4)

    # merging: what can be folded reproduces the unmerged outputs
    unmergeable = loaded.unmergeable_methods()
    if unmergeable:
        with pytest.raises(ValueError, match="cannot merge"):
            loaded.merge_and_unload()
    merged = loaded.merge_and_unload(strict=False)
    with torch.no_grad():
        torch.testing.assert_close(run(merged, x), tuned, rtol=1e-5, atol=1e-5)
    remaining = {k for m in merged.modules() if hasattr(m, "peft") for k in m.peft}
    assert all(not a.mergeable for m in merged.modules() if hasattr(m, "peft") for a in m.peft.values())
    if not unmergeable:
        assert not remaining


def test_merged_language_model_round_trips_through_transformers(tmp_path):
    base = tiny_lm()
    peft = get_peft_model(base, PeftConfig({"lora_embed": {}, "lora_in_proj": {}, "lora_dt": {"dora": True},
                                            "A": {}, "conv1d": {}}))
    perturb(peft)
    x = inputs("lm")
    with torch.no_grad():
        tuned = peft(x).logits
    merged = peft.merge_and_unload()
    assert not merged.config.tie_word_embeddings  # the embedding LoRA only changed the input side
    merged.save_pretrained(tmp_path)
    import transformers
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, tuned, rtol=1e-4, atol=1e-4)


def test_affix_store_z_half_gets_exactly_zero_gradient():
    peft = get_peft_model(tiny_lm(), PeftConfig({"affix": {"store_z": True}}))
    peft(inputs("lm")).logits.pow(2).mean().backward()
    tokens = peft.base_model.backbone.peft["affix"].tokens
    g = tokens.grad.view(3, 2, 2, 64)        # (n, layers, [x | z], E)
    assert g[:, :, 0].abs().sum() > 0 and g[:, :, 1].abs().sum() == 0


def test_collapse_projection_keeps_outputs_and_drops_the_mlp():
    peft = get_peft_model(tiny_lm(), PeftConfig({"affix": {"projection": True}, "prompt": {"projection": True}}))
    x = inputs("lm")
    with torch.no_grad():
        before = peft(x).logits
    peft.collapse_projections()
    with torch.no_grad():
        torch.testing.assert_close(peft(x).logits, before, rtol=1e-5, atol=1e-5)
    counts = peft.trainable_parameters_by_method()
    assert counts == {"affix": 3 * 2 * 64, "prompt": 8 * 32}


def test_param_groups_apply_multipliers_and_decay_rules():
    peft = get_peft_model(tiny_lm(), PeftConfig({"lora_X": {"lr_mult": 2.0, "wd_mult": 0.5}, "bias": {},
                                                 "additional_scan": {}, "A": {"wd_mult": 3.0}}))
    groups = {(g["method"], g["weight_decay"]): g for g in peft.param_groups(lr=1e-3, weight_decay=0.01)}
    assert groups["lora_X", 0.005]["lr"] == 2e-3
    assert ("bias", 1.0) in groups                      # dt bias deltas: 100x by default
    assert ("A", 0.03) in groups
    a_logs = groups["additional_scan", 0.0]["params"]   # Additional-scan's A_log: no decay
    assert all(p.shape == (64, 6) for p in a_logs) and len(a_logs) == 2
    assert groups["additional_scan", 0.01]["params"]
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == peft.num_parameters()[0]


def test_adapter_refuses_another_base(tmp_path):
    peft = get_peft_model(tiny_lm(), PeftConfig({"lora_X": {}}))
    peft.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="another base model.*hidden_size"):
        PeftModel.from_pretrained(tiny_lm(hidden_size=48), tmp_path)
    with pytest.raises(CheckpointError, match="another base model.*kind"):
        PeftModel.from_pretrained(tiny_vim(), tmp_path)


def test_adapter_files_hold_only_trained_tensors(tmp_path):
    from safetensors.torch import load_file
    peft = get_peft_model(tiny_lm(), PeftConfig({"lora_embed": {}, "D": {}}))
    peft.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert names == {"backbone.peft.lora_embed.A", "backbone.peft.lora_embed.B"} | {
        f"backbone.layers.{i}.mixer.peft.D.delta" for i in range(2)}


@pytest.mark.parametrize("bad,message", [
    ({"lora_q": {}}, "unknown method 'lora_q'; expected one of lora_in_proj"),
    ({"lora_X": {"rank": 4}}, "unknown setting.*rank.*expected some of.*r"),
    ({"lora_X": {"r": 0}}, r"lora_X.r must be an integer >= 1"),
    ({"affix": {"tokens": 0}}, r"affix.tokens must be an integer >= 1"),
    ({"affix": {"position": "suffix"}}, "position='suffix' does not exist; expected one of prefix, infix, outer"),
    ({"additional_scan": {"states": -1}}, "states must be an integer >= 1"),
    ({"lora_X": {"dropout": 1.5}}, r"dropout must be in \[0, 1\)"),
    ({"lora_X": {"dora": "false"}}, r"lora_X.dora must be true or false, got 'false'"),
    ({"lora_X": {"scale": "0.1"}}, r"lora_X.scale must be a number, got '0.1'"),
    ({"lora_X": {"r": 2.0}}, r"lora_X.r must be an integer >= 1, got 2.0"),
    ({"lora_X": 4}, r"methods.lora_X: expected an object of settings"),
    ({"prompt": {"hidden": 0}}, r"prompt.hidden must be an integer >= 1"),
    ({"additional_scan": {"init": "zeros"}}, "init='zeros' does not exist; expected one of copy_first, s4d"),
    ({"A": {"wd_mult": -1}}, r"A.wd_mult must be a number >= 0"),
])
def test_config_errors_say_what_is_allowed(bad, message):
    with pytest.raises(ConfigError, match=message):
        PeftConfig(bad)


def test_settings_as_a_list_or_number_are_refused():
    with pytest.raises(ConfigError, match="methods: expected an object mapping method names"):
        PeftConfig(4)
    with pytest.raises(ConfigError, match="cfg.json: expected an object with a 'methods' object"):
        PeftConfig.from_dict({"methods": 3}, "cfg.json")


def test_config_model_applicability_and_json():
    with pytest.raises(ConfigError, match="'cls' does not apply to a language model; methods for it: lora_in_proj"):
        get_peft_model(tiny_lm(), PeftConfig({"cls": {}}))
    with pytest.raises(ConfigError, match="turns on no method"):
        get_peft_model(tiny_lm(), PeftConfig({}))
    c = PeftConfig({"lora_X": {"r": 64}, "affix": {"tokens": 2}})
    again = PeftConfig.from_json(c.to_json())
    assert again == c and again.methods["lora_X"].scale == 0.1
    with pytest.raises(ConfigError, match="adapter_config.json: expected an object with a 'methods'"):
        PeftConfig.from_dict({"lora": 1}, "adapter_config.json")
    assert preset("sll_lora", size="1.4b").methods["lora_embed"].r == 64
    assert preset("lora_out_proj", model="vim").methods["lora_out_proj"].r == 96


# ---- trainable-parameter counts against METHODS.md formulas ------------------------------------
def lm_130m():
    from mambapeft.models import MambaConfig, MambaForCausalLM
    with torch.device("meta"):
        return MambaForCausalLM(MambaConfig(), init=False)


def vim_s():
    with torch.device("meta"):
        return VisionMamba(VimConfig.preset("vim-small"), init=False)


D, E, R, N, L, V, k = 768, 1536, 48, 16, 24, 50280, 4
r = 8
LM_COUNTS = {
    "lora_in_proj": L * r * (D + 2 * E), "lora_out_proj": L * r * (E + D), "lora_x_proj": L * r * (E + R + 2 * N),
    "lora_dt": L * r * (R + E), "lora_embed": r * (V + D), "lora_X": L * r * (D + E), "lora_Z": L * r * (D + E),
    "lora_d": L * r * (E + R), "lora_B": L * r * (E + N), "lora_C": L * r * (E + N), "A": L * E * N, "D": L * E,
    "conv1d": L * E * k, "bias": L * E, "prompt": 8 * D, "affix": 3 * L * E, "additional_scan": 3 * L * E * 6,
    "parallel_adapter": L * 32 * (E + D)}


@pytest.mark.parametrize("method", list(LM_COUNTS))
def test_counts_mamba_130m(method):
    peft = get_peft_model(lm_130m(), PeftConfig({method: {}}))
    assert peft.trainable_parameters_by_method() == {method: LM_COUNTS[method]}


def test_counts_mamba_130m_variants():
    def count(methods):
        return sum(get_peft_model(lm_130m(), PeftConfig(methods)).trainable_parameters_by_method().values())
    assert count({"prompt": {"projection": True}}) == 8 * D + 2 * (D * D + D)
    assert count({"affix": {"store_z": True}}) == 3 * L * 2 * E                      # the paper's count
    T = 2 * E                                                                       # reference: hidden = width
    assert count({"affix": {"store_z": True, "projection": True}}) == 3 * T + T * T + T + T * L * T + L * T
    assert count({"lora_X": {"dora": True, "r": 64}}) == L * 64 * (D + E) + L * E   # + magnitudes
    assert count({"lora_embed": {"dora": True}}) == r * (V + D) + V
    assert count({"full": {}}) == 129_135_360                                       # mamba-130m


def falcon_7b():
    from mambapeft.models import MambaConfig, MambaForCausalLM
    with torch.device("meta"):
        return MambaForCausalLM(MambaConfig.preset("falcon-mamba-7b"), init=False)


Df, Ef, Rf, Lf, Vf = 4096, 8192, 256, 64, 65024
FALCON_7B_COUNTS = {  # the same formulas at D=4096, 64 layers, vocab 65024, untied head
    "lora_in_proj": Lf * r * (Df + 2 * Ef), "lora_out_proj": Lf * r * (Ef + Df),
    "lora_x_proj": Lf * r * (Ef + Rf + 2 * N), "lora_dt": Lf * r * (Rf + Ef), "lora_embed": r * (Vf + Df),
    "lora_X": Lf * r * (Df + Ef), "lora_Z": Lf * r * (Df + Ef), "lora_d": Lf * r * (Ef + Rf),
    "lora_B": Lf * r * (Ef + N), "lora_C": Lf * r * (Ef + N), "A": Lf * Ef * N, "D": Lf * Ef, "conv1d": Lf * Ef * k,
    "bias": Lf * Ef, "prompt": 8 * Df, "affix": 3 * Lf * Ef, "additional_scan": 3 * Lf * Ef * 6,
    "parallel_adapter": Lf * 32 * (Ef + Df),
    "full": 2 * Vf * Df + Df + Lf * (Df + 2 * Ef * Df + Ef * (k + 1) + Ef * (Rf + 2 * N) + Rf * Ef + Ef
                                     + Ef * N + Ef + Ef * Df)}


@pytest.mark.parametrize("method", list(FALCON_7B_COUNTS))
def test_counts_falcon_mamba_7b(method):
    peft = get_peft_model(falcon_7b(), PeftConfig({method: {}}))
    assert peft.trainable_parameters_by_method() == {method: FALCON_7B_COUNTS[method]}


def test_counts_falcon_mamba_7b_presets():
    def count(name, **kw):
        return get_peft_model(falcon_7b(), preset(name, **kw)).num_parameters()[0]
    assert FALCON_7B_COUNTS["full"] == 7_272_665_088                              # tiiuae/falcon-mamba-7b
    assert count("lora_X") == Lf * 64 * (Df + Ef)
    assert count("additional_scan") == FALCON_7B_COUNTS["additional_scan"]
    r7 = 256                                                                      # 8 x 32
    assert count("sll_lora", size="7b") == Lf * r7 * ((Ef + Df) + (Df + 2 * Ef) + (Ef + Rf + 2 * N)) + r7 * (Vf + Df)


Ds, Es, Rs, P = 384, 768, 24, 197
VIM_COUNTS = {
    "lora_in_proj": L * r * (Ds + 2 * Es), "lora_out_proj": L * r * (Es + Ds),
    "lora_x_proj": 2 * L * r * (Es + Rs + 2 * N), "lora_dt": 2 * L * r * (Rs + Es), "lora_embed": r * (3 * 256 + Ds),
    "lora_X": L * r * (Ds + Es), "lora_Z": L * r * (Ds + Es), "lora_d": 2 * L * r * (Es + Rs),
    "lora_B": 2 * L * r * (Es + N), "lora_C": 2 * L * r * (Es + N), "A": 2 * L * Es * N, "D": 2 * L * Es,
    "conv1d": 2 * L * Es * k, "bias": 2 * L * Es, "cls": Ds, "pos": P * Ds, "prompt": 8 * Ds,
    "affix": 3 * L * 2 * Es, "additional_scan": 2 * 3 * L * Es * 6, "parallel_adapter": L * 32 * (Es + Ds),
    "head": Ds * 1000 + 1000}


@pytest.mark.parametrize("method", list(VIM_COUNTS))
def test_counts_vim_small(method):
    peft = get_peft_model(vim_s(), PeftConfig({method: {}}))
    assert peft.trainable_parameters_by_method() == {method: VIM_COUNTS[method]}


@pytest.mark.parametrize("kind", ["lm", "vim"])
def test_all_methods_same_on_every_cpu_backend(kind):
    """The composed tensors are what every backend reads: outputs and gradients agree."""
    from mambapeft.ops.scan import scan_backend
    peft = get_peft_model(make(kind), PeftConfig(ALL_LM if kind == "lm" else ALL_VIM))
    perturb(peft)
    x = inputs(kind)
    results = []
    for backend in ("reference", "cpu"):
        peft.zero_grad()
        with scan_backend(backend):
            out = run(peft, x)
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in peft.base_model.named_parameters()
                                        if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_infix_tokens_sit_between_equal_chunks():
    from mambapeft.models.tokens import infix_offsets, insert_tokens_at, take_positions
    seq = torch.arange(1.0, 8.0).repeat(2, 1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    out, out_mask, keep = insert_tokens_at(seq, torch.tensor([-1.0, -2.0]), mask, 1, infix_offsets(2, 7, mask))
    assert out.tolist() == [[1, 2, -1, 3, 4, -2, 5, 6, 7], [1, 2, 3, 4, -1, 5, -2, 6, 7]]
    assert out_mask[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    torch.testing.assert_close(take_positions(out, 2, keep), seq)


def test_generate_with_all_methods_left_padded_equals_alone():
    peft = get_peft_model(tiny_lm(), PeftConfig(ALL_LM))
    perturb(peft)
    check_left_padded_generation(peft)
