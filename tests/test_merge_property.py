"""Merge as a property: for random combinations of the mergeable methods (each LoRA with or
without DoRA), the merged model equals the unmerged one within 1e-5, and a merged language model
loads in transformers with the same logits. Tiny shapes and fixed seeds keep it fast and repeatable."""
import random

import torch
from helpers import hf_tiny, tiny_lm
from test_peft import inputs, perturb, run, tiny_vim

from mambapeft.peft import METHODS, PeftConfig, get_peft_model

COMBINATIONS = 200   # per model kind
LORA = [n for n, s in METHODS.items() if n.startswith("lora_")]


def mergeable(kind):
    """Every method whose adapters merge_and_unload folds into the base weights."""
    probe = get_peft_model(tiny_lm() if kind == "lm" else tiny_vim(),
                           PeftConfig({n: {} for n, s in METHODS.items() if kind in s.models and n != "head"}))
    return sorted(set(probe.peft_config.methods) - set(probe.unmergeable_methods()))


def combination(rng, names):
    chosen = rng.sample(names, rng.randint(1, min(6, len(names))))
    return {n: {"dora": rng.random() < 0.5, "r": rng.choice([1, 2, 4])} if n in LORA else {} for n in chosen}


def merged_equals_unmerged(kind, methods, x):
    peft = get_peft_model(tiny_lm() if kind == "lm" else tiny_vim(), PeftConfig(methods))
    perturb(peft)
    with torch.no_grad():
        tuned = run(peft, x)
        merged = peft.merge_and_unload()
        err = (run(merged, x) - tuned).abs().max().item()
    return err, merged, tuned


def test_merge_equals_forward_for_random_combinations_lm():
    rng, names, x = random.Random(7), mergeable("lm"), inputs("lm")
    hf = {tie: hf_tiny(tie_word_embeddings=tie) for tie in (True, False)}
    bad = []
    for _ in range(COMBINATIONS):
        methods = combination(rng, names)
        err, merged, tuned = merged_equals_unmerged("lm", methods, x)
        if err > 1e-5:
            bad.append((methods, err))
            continue
        theirs = hf[merged.config.tie_word_embeddings]   # the same tensors under transformers' names
        theirs.load_state_dict({k: v for k, v in merged.state_dict().items() if ".peft." not in k}, strict=True)
        with torch.no_grad():
            hf_err = (theirs(x).logits - tuned).abs().max().item()
        if hf_err > 1e-4:
            bad.append((methods, f"transformers {hf_err}"))
    assert not bad, f"{len(bad)} of {COMBINATIONS} combinations differ, e.g. {bad[:3]}"


def test_merge_equals_forward_for_random_combinations_vim():
    rng, names, x = random.Random(11), mergeable("vim") + ["head"], inputs("vim")
    bad = []
    for _ in range(COMBINATIONS):
        methods = combination(rng, names)
        err, _, _ = merged_equals_unmerged("vim", methods, x)
        if err > 1e-5:
            bad.append((methods, err))
    assert not bad, f"{len(bad)} of {COMBINATIONS} combinations differ, e.g. {bad[:3]}"


def test_merged_language_model_saved_and_read_by_transformers(tmp_path):
    import transformers
    x = inputs("lm")
    err, merged, tuned = merged_equals_unmerged("lm", {"lora_embed": {"dora": True}, "lora_in_proj": {},
                                                       "lora_X": {"dora": True}, "lora_out_proj": {"dora": True},
                                                       "bias": {}, "lora_B": {}}, x)
    merged.save_pretrained(tmp_path)
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, tuned, rtol=1e-4, atol=1e-4)
