"""Small models and utilities shared by the tests."""
import torch

from mambapeft.models import MambaConfig, MambaForCausalLM


def tiny_lm_config(**kw):
    return MambaConfig(**{"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 16,
                          "time_step_rank": 4, **kw})


def tiny_lm(**kw):
    return MambaForCausalLM(tiny_lm_config(**kw)).eval()


def hf_tiny(**kw):
    import transformers
    cfg = transformers.MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=16,
                                   time_step_rank=4, **kw)
    return transformers.MambaForCausalLM(cfg).eval()


def decode_stepwise(model, ids, prefill, cache_cls=None):
    """Logits of a prefill of `prefill` tokens followed by one-token steps, concatenated."""
    from mambapeft.models import MambaCache
    cache = MambaCache(len(model.backbone.layers)) if cache_cls is None else cache_cls()
    out = [model(ids[:, :prefill], cache=cache).logits]
    out += [model(ids[:, t:t + 1], cache=cache).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(out, 1)


def check_left_padded_generation(model):
    """generate() on a left-padded batch gives each row what it gets alone; returns (batch, mask)."""
    long, short = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, mask, max_new_tokens=5, eos_token_id=-1)
    torch.testing.assert_close(out[0:1], model.generate(long, max_new_tokens=5, eos_token_id=-1))
    torch.testing.assert_close(out[1:, 3:], model.generate(short, max_new_tokens=5, eos_token_id=-1))
    return batch, mask


def tiny_falcon(**kw):
    return tiny_lm(mixer_rms_eps=1e-6, **kw)


def hf_tiny_falcon(**kw):
    import transformers
    cfg = transformers.FalconMambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=16,
                                         time_step_rank=4, **kw)
    return transformers.FalconMambaForCausalLM(cfg).eval()


def check_linear_cross_entropy(device, tie, monkeypatch):
    """linear_cross_entropy over several chunks, 2 of 23 rows ignored, equals F.cross_entropy of the
    full logits: the loss, h's gradient, the head's gradient when it trains (tie), and the loss
    without a gradient."""
    from mambapeft.ops import cross_entropy
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 97 * 5)   # several chunks
    torch.manual_seed(0)
    h = torch.randn(23, 16, device=device, requires_grad=True)
    w = torch.randn(97, 16, device=device, requires_grad=tie)
    labels = torch.randint(0, 97, (23,), device=device)
    labels[[3, 7]] = -100
    loss = cross_entropy.linear_cross_entropy(h, w, labels)
    (3 * loss).backward()
    got = loss.detach(), h.grad.clone(), w.grad.clone() if tie else None
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, ignore_index=-100)
    (3 * ref).backward()
    torch.testing.assert_close(got[0], ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], h.grad, rtol=1e-5, atol=1e-6)
    if tie:
        torch.testing.assert_close(got[2], w.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy.linear_cross_entropy(h, w, labels), ref.detach(),
                                   rtol=1e-5, atol=1e-6)
