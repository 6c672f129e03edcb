"""`mambapeft pretrain lm|vim` on tiny corpora the tests write: the outputs load (our loaders and
transformers for the LM, the tokenizer round-trips text, the Vim takes a new head), the loss falls,
the images go through the vision protocol's preprocessing, and a bad corpus is one line."""
import gzip
import json
import random
import warnings

import numpy as np
import pytest
import torch

from mambapeft.cli import main
from mambapeft.io import write_safetensors
from mambapeft.training import logs

WORDS = "the cat sat on a mat while dogs ran past old red barns under grey skies".split()
TINY_LM = ["--vocab-size", "300", "--d-model", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "4",
           "--warmup", "0", "--validation", "0.1", "--device", "cpu"]
TINY_VIM = ["--image-size", "8", "--patch-size", "4", "--embed-dim", "16", "--depth", "1", "--batch-size", "8",
            "--warmup", "0", "--validation", "0.2", "--device", "cpu"]


def text_corpus(folder, docs=120, gz=False):
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + ".",
                                "source": "test"}) + "\n" for _ in range(docs))
    if gz:
        with gzip.open(folder / "text.jsonl.gz", "wt") as f:
            f.write(lines)
    else:
        (folder / "text.jsonl").write_text(lines)
    return folder


def image_corpus(folder, labels=True):
    """Two sources in the corpus format; class k is a bright square at one of the corners."""
    g = np.random.default_rng(0)
    arrays = {}
    for name, side, n in (("fashion_mnist", 28, 80), ("digits", 8, 40)):
        y = np.arange(n) % 4
        a = g.integers(0, 60, (n, side, side))
        h = side // 2
        for i, k in enumerate(y):
            r, c = divmod(int(k), 2)
            a[i, r * h:(r + 1) * h, c * h:(c + 1) * h] += 180
        arrays[name] = torch.from_numpy(a.astype(np.uint8))
        if labels:
            arrays[name + "_labels"] = torch.from_numpy(y.astype(np.int64))
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "images.safetensors", arrays)
    return folder


def test_pretrain_lm_writes_a_model_and_tokenizer_that_both_loaders_read(tmp_path):
    import transformers
    from mambapeft.models import MambaForCausalLM
    from mambapeft.models.checkpoint import load_tokenizer
    corpus, out = text_corpus(tmp_path / "corpus", gz=True), tmp_path / "lm"
    assert main(["pretrain", "lm", str(corpus), str(out), "--steps", "3", "--eval-every", "2", *TINY_LM]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "pretrain.json", "run"}
    assert {p.name for p in (out / "run").iterdir()} == {"config.yaml", "log.jsonl", "curves.png", "metrics.json"}
    tok = load_tokenizer(out)
    text = "the cat sat under grey skies, naïve café 7"   # bytes the corpus never had still encode
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == 0
    ours = MambaForCausalLM.from_pretrained(out)
    theirs = transformers.MambaForCausalLM.from_pretrained(out).eval()
    assert ours.config.vocab_size == len(tok) and ours.config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["result"]["steps"] == 3 and summary["corpus"]["documents"] == 120
    assert summary["corpus"]["train_tokens"] >= summary["corpus"]["train_rows"] * 16
    validation = [r for r in logs.read(out / "run" / "log.jsonl") if r.get("split") == "validation"]
    assert [r["step"] for r in validation] == [2, 3]
    assert summary["result"]["validation_loss"] == min(r["loss"] for r in validation)   # the best weights kept


def test_pretrain_lm_loss_falls(tmp_path):
    corpus, out = text_corpus(tmp_path / "corpus"), tmp_path / "lm"
    assert main(["pretrain", "lm", str(corpus), str(out), "--steps", "40", "--eval-every", "40", "--lr", "1e-2",
                 *TINY_LM]) == 0
    train = [r["loss"] for r in logs.read(out / "run" / "log.jsonl") if "split" not in r]
    assert len(train) == 40 and np.mean(train[-5:]) < 0.7 * np.mean(train[:5]), train
    assert json.loads((out / "pretrain.json").read_text())["result"]["validation_loss"] < 0.7 * np.log(300)


def test_pretrain_vim_writes_a_model_that_takes_a_new_head(tmp_path):
    from mambapeft.models import VisionMamba
    corpus, out = image_corpus(tmp_path / "corpus"), tmp_path / "vim"
    assert main(["pretrain", "vim", str(corpus), str(out), "--steps", "3", "--eval-every", "3", *TINY_VIM]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "pretrain.json", "run"}
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["config"]["num_classes"] == 8   # 4 classes per source, one head
    assert summary["corpus"]["classes"] == {"fashion_mnist": [0, 4], "digits": [4, 8]}
    assert {"acc", "acc_fashion_mnist", "acc_digits"} <= set(summary["result"]["validation"])
    base = VisionMamba.from_pretrained(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = VisionMamba.from_pretrained(out, num_classes=5)   # a task of the vision suite: its own head
    kept = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    for k, v in kept.items():
        assert torch.equal(new.state_dict()[k], v), k
    assert new(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_the_vim_sees_images_as_the_vision_protocol_does(tmp_path):
    """The corpus images, resized once from the arrays, equal what vision/data.py gives for the same
    image saved as a PNG (the suite's format)."""
    from PIL import Image
    from mambapeft.pretrain.images import ImageTask, prepare, read_images, split_sources
    from mambapeft.vision.data import ImageDataset, Sample, normalise
    _, sources = read_images(image_corpus(tmp_path / "corpus"))
    images = sources["digits"][0][:3]
    for i, a in enumerate(images):
        Image.fromarray(a, "L").save(tmp_path / f"{i}.png")
    protocol = ImageDataset([Sample(str(tmp_path / f"{i}.png"), 0, "x") for i in range(3)], size=12)
    ours = normalise(prepare(images, 12))
    torch.testing.assert_close(ours, torch.stack([protocol[i][0] for i in range(3)]), rtol=0, atol=1e-6)
    train, val, classes = split_sources(sources, 12, 0.25, seed=0)
    assert len(train) + len(val) == 120 and len(val) == 30 and classes == {"fashion_mnist": (0, 4), "digits": (4, 8)}
    assert set(val.labels.tolist()) == set(range(8))


def test_pretrain_vim_loss_falls(tmp_path):
    corpus, out = image_corpus(tmp_path / "corpus"), tmp_path / "vim"
    assert main(["pretrain", "vim", str(corpus), str(out), "--steps", "40", "--eval-every", "40", "--lr", "1e-2",
                 *TINY_VIM]) == 0
    train = [r["loss"] for r in logs.read(out / "run" / "log.jsonl") if "split" not in r]
    assert len(train) == 40 and np.mean(train[-5:]) < 0.75 * np.mean(train[:5]), train
    assert json.loads((out / "pretrain.json").read_text())["result"]["validation"]["acc"] > 0.4   # chance: 1/8


def _bad_text(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "text.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    return ["lm", str(tmp_path / "c")], "text.jsonl:2: field 'text'"


@pytest.mark.parametrize("case", ["no folder", "no text file", "bad field", "no image file", "no labels"])
def test_a_bad_corpus_is_one_line(tmp_path, capsys, case):
    if case == "no folder":
        args, expect = ["lm", str(tmp_path / "missing")], "no such corpus folder"
    elif case == "no text file":
        image_corpus(tmp_path / "c")
        args, expect = ["lm", str(tmp_path / "c")], "no text.jsonl or text.jsonl.gz"
    elif case == "bad field":
        args, expect = _bad_text(tmp_path)
    elif case == "no image file":
        text_corpus(tmp_path / "c")
        args, expect = ["vim", str(tmp_path / "c")], "images.safetensors: not found"
    else:
        image_corpus(tmp_path / "c", labels=False)
        args, expect = ["vim", str(tmp_path / "c")], "fashion_mnist: no labels (fashion_mnist_labels)"
    assert main(["pretrain", *args, str(tmp_path / "out"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambapeft: error: ") and err.count("\n") == 1 and expect in err, err


def test_a_used_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["pretrain", "lm", str(text_corpus(tmp_path / "c")), str(tmp_path / "out")]) == 2
    assert "must be new or empty" in capsys.readouterr().err


def test_the_tokenizer_is_the_same_on_each_run():
    from mambapeft.pretrain.tokenizer import train_tokenizer
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    a, b = (train_tokenizer(texts, 320).backend_tokenizer.to_str() for _ in range(2))
    assert a == b and 257 < len(train_tokenizer(texts, 320)) <= 320   # bytes, EOS and merges up to the size asked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["lm", "vim"])
def test_pretrain_on_cuda_in_bf16(tmp_path, kind):
    """The run the lead makes on the GPU, at a tiny scale: bf16 autocast, the CUDA kernels, saved on CPU."""
    corpus = text_corpus(tmp_path / "c") if kind == "lm" else image_corpus(tmp_path / "c")
    tiny = [a if a != "cpu" else "cuda" for a in (TINY_LM if kind == "lm" else TINY_VIM)]
    assert main(["pretrain", kind, str(corpus), str(tmp_path / "out"), "--steps", "20", "--eval-every", "10",
                 "--lr", "1e-2", *tiny]) == 0
    summary = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    assert summary["device"] != "cpu" and summary["result"]["steps"] == 20
    train = [r["loss"] for r in logs.read(tmp_path / "out" / "run" / "log.jsonl") if "split" not in r]
    assert np.isfinite(train).all() and np.mean(train[-5:]) < np.mean(train[:5])
