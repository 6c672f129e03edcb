"""The language model against transformers, checkpoint formats, decoding and padding."""
import pytest
import torch
from helpers import check_left_padded_generation, decode_stepwise, hf_tiny, tiny_lm

from mambapeft.io import CheckpointError
from mambapeft.models import MambaForCausalLM
from mambapeft.models.checkpoint import load_tokenizer
from mambapeft.ops.scan import scan_backend

BACKENDS = ["reference", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_equal_transformers_both_ways(tmp_path, backend):
    hf = hf_tiny()
    hf.save_pretrained(tmp_path / "hf")
    ours = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad(), scan_backend(backend):
        expected = hf(ids).logits
        assert (ours(ids).logits - expected).abs().max() <= 1e-4
        ours.save_pretrained(tmp_path / "ours")
    import transformers
    back = transformers.MambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(ids).logits - expected).abs().max() <= 1e-4


def test_sharded_safetensors_and_bin(tmp_path):
    hf = hf_tiny()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = MambaForCausalLM.from_pretrained(tmp_path / "sharded")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    b = MambaForCausalLM.from_pretrained(tmp_path / "bin")
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_original_state_spaces_format(tmp_path):
    import json
    ours = tiny_lm(vocab_size=104)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ours.state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 32, "n_layer": 2, "vocab_size": 97, "pad_vocab_size_multiple": 8,
        "ssm_cfg": {"dt_rank": 4}, "rms_norm": True, "residual_in_fp32": True, "tie_embeddings": True}))
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == 104
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_bad_checkpoints_name_the_problem(tmp_path):
    hf = hf_tiny()
    hf.save_pretrained(tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights found"):
        MambaForCausalLM.from_pretrained(tmp_path / "empty")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text('{"n_embd": 32}')
    with pytest.raises(ValueError, match="not a Mamba config"):
        MambaForCausalLM.from_pretrained(tmp_path / "alien")
    # names and shapes that do not match the config
    import json
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["state_size"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    state = dict(hf.state_dict())
    state["backbone.extra.weight"] = torch.zeros(1)
    del state["backbone.norm_f.weight"]
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        MambaForCausalLM.from_pretrained(bad)
    msg = str(e.value)
    assert "backbone.norm_f.weight" in msg and "backbone.extra.weight" in msg and "A_log" in msg
    # a pickle that needs full unpickling
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save({"model": _Custom()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        MambaForCausalLM.from_pretrained(evil)
    with pytest.raises(CheckpointError, match="no such directory"):
        MambaForCausalLM.from_pretrained(str(tmp_path / "missing"))


class _Custom:
    pass


def test_hub_id_offline_fails_clearly():
    with pytest.raises(CheckpointError, match="hub download failed"):
        MambaForCausalLM.from_pretrained("state-spaces/mamba-130m-hf-not-cached")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_equals_full_forward(backend):
    model = tiny_lm()
    ids = torch.randint(0, 97, (3, 17))
    with torch.no_grad(), scan_backend(backend):
        full = model(ids).logits
        for prefill in (1, 2, 9):
            torch.testing.assert_close(decode_stepwise(model, ids, prefill), full, rtol=1e-4, atol=1e-4)


def test_generate_greedy_matches_full_forward_argmax():
    model = tiny_lm()
    ids = torch.randint(1, 97, (2, 5))
    out = model.generate(ids, max_new_tokens=6, eos_token_id=-1)
    assert out.shape == (2, 11)
    with torch.no_grad():
        logits = model(out).logits
    torch.testing.assert_close(out[:, 5:], logits[:, 4:-1].argmax(-1), rtol=0, atol=0)
    # top-k 1 sampling and a tiny nucleus are greedy too
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=-1, generator=g), out)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=6, do_sample=True, top_p=1e-6, eos_token_id=-1, generator=g), out)
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=5.0, eos_token_id=-1, generator=g)
    assert sampled.shape == out.shape


def test_generate_stops_at_eos_and_pads():
    model = tiny_lm()
    ids = torch.randint(1, 97, (2, 4))
    first = model.generate(ids, max_new_tokens=1, eos_token_id=-1)[:, -1]
    out = model.generate(ids, max_new_tokens=5, eos_token_id=int(first[0]), pad_token_id=0)
    assert out[0, 4] == first[0] and bool((out[0, 5:] == 0).all())


def test_generate_stops_at_the_step_every_row_finished():
    """The host looks for the end only every few steps; the tokens made after it are trimmed."""
    model = tiny_lm()
    ids = torch.randint(1, 97, (1, 4))
    free = model.generate(ids, max_new_tokens=20, eos_token_id=-1)
    eos = int(free[0, 4 + 2])
    k = int((free[0, 4:] == eos).nonzero()[0, 0])                # where the eos first appears
    out = model.generate(ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, free[:, :4 + k + 1])


def test_generate_left_padded_batch_equals_alone():
    model = tiny_lm()
    batch, mask = check_left_padded_generation(model)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(batch, mask.flip(1), max_new_tokens=2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded(side):
    model = tiny_lm()
    seqs = [torch.randint(1, 97, (n,)) for n in (9, 4, 6)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        batch = model(ids, mask).logits
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            got = batch[i, T - len(s):] if side == "left" else batch[i, :len(s)]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_tokenizer_through_autotokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "hello", "mamba", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded("hello mamba")["input_ids"] == [1, 2]
    (tmp_path / "none").mkdir()
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(tmp_path / "none")


def test_captured_decoding_step_is_kept_only_while_the_model_is_unchanged():
    """cuda_graph.fingerprint decides when generate() may replay a step captured in an earlier call
    (on CUDA; the fingerprint itself is device-free)."""
    from mambapeft.models.cuda_graph import fingerprint
    from mambapeft.peft import PeftConfig, get_peft_model
    model = get_peft_model(tiny_lm(), PeftConfig({"lora_in_proj": {"r": 2}})).base_model.eval()
    base = fingerprint(model)
    with torch.no_grad():
        model(torch.randint(1, 97, (2, 5)))
        model.backbone.layers[0].mixer.D.add_(1.0)       # values changed in place: replay reads them
    assert fingerprint(model) == base
    lora = next(m for m in model.modules() if hasattr(m, "scale") and isinstance(m.scale, float))
    changed = []
    for edit, undo in ((lambda: setattr(lora, "scale", lora.scale * 2), lambda: setattr(lora, "scale", lora.scale / 2)),
                       (model.train, model.eval)):
        edit()
        changed.append(fingerprint(model) != base)
        undo()
        assert fingerprint(model) == base
    hook = model.backbone.norm_f.register_forward_hook(lambda m, i, o: o * 2)
    changed.append(fingerprint(model) != base)
    hook.remove()
    assert fingerprint(model) == base
    mixer = model.backbone.layers[1].mixer
    mixer.D = torch.nn.Parameter(mixer.D.detach().clone())   # a new tensor: a new capture
    changed.append(fingerprint(model) != base)
    assert changed == [True, True, True, True]
