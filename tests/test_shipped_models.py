"""The pretrained models the package ships (assets/mamba-default, assets/vim-default) load with our
loaders and transformers, and are the trained ones: they do well on held-out data they never saw."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mambapeft.default import shipped
from mambapeft.models import MambaForCausalLM, VisionMamba
from mambapeft.models.checkpoint import load_tokenizer
from mambapeft.vision.data import normalise, rgb_pixels


def _fortune_passages(n):
    lines = (shipped.language_suite_dir() / "fortune_topic.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["passage"] for line in lines]


def test_the_shipped_language_model_loads_in_both_loaders_and_predicts_unseen_text():
    transformers = pytest.importorskip("transformers")
    path = shipped.model_path("mamba-default")
    ours = MambaForCausalLM.from_pretrained(path)
    tok = load_tokenizer(path)
    text = "Wisdom is knowing what to do next."
    assert tok.decode(tok(text).input_ids) == text
    ids = tok(text, return_tensors="pt").input_ids
    theirs = transformers.MambaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
    # test passages of the suite, left out of the pretraining corpus: a random model of this
    # vocabulary scores about ln(3072) = 8.0 nats a token, the shipped one about ln(28)
    losses = []
    with torch.no_grad():
        for p in _fortune_passages(8):
            ids = tok(p, return_tensors="pt").input_ids
            losses.append(float(ours(ids, labels=ids).loss))
    assert sum(losses) / len(losses) < 5.0, losses
    assert ours.config.vocab_size == len(tok) == 3072


def test_the_shipped_vim_classifies_held_out_clothing_with_its_pretraining_head():
    vim = VisionMamba.from_pretrained(shipped.model_path("vim-default")).eval()
    assert vim.config.img_size == 32 and vim.config.num_classes == 20
    pack = shipped.VISION / "clothing.safetensors.gz"
    _, test = shipped.read_vision_pack(pack)   # Fashion-MNIST test images, not in the image corpus
    test = test[:64]
    x = normalise(torch.stack([rgb_pixels(im, 32) for im, _ in test]))
    labels = torch.tensor([y for _, y in test])
    with torch.no_grad():
        logits = vim(x)
    assert logits.shape == (64, 20)
    # classes 0-9 of the pretraining head are Fashion-MNIST's; chance is 0.1, the model 0.91 held out
    acc = float((logits[:, :10].argmax(-1) == labels).float().mean())
    assert acc > 0.7, acc
    assert math.isfinite(float(F.cross_entropy(logits[:, :10], labels)))


def test_the_shipped_vim_takes_a_new_head_for_a_suite_task():
    with pytest.warns(UserWarning):
        vim = VisionMamba.from_pretrained(shipped.model_path("vim-default"), num_classes=4)
    assert vim(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
