"""The default's corpora and task suites: built from small sources the test writes (and from the real
installed packages when present), loaded by the language scorer and the vision data loader, seeded,
with no test item in a corpus, and a one-line error for a missing source package."""
import gzip
import hashlib
import json
import os
import random
import struct
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mambapeft-test-datasets-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mambapeft.cli import DEFAULT_MODEL, main  # noqa: E402
from mambapeft.default import corpora, sources  # noqa: E402
from mambapeft.io import write_safetensors  # noqa: E402

TOPIC_WORDS = {"art": "painter canvas colour gallery sculpture", "computers": "program kernel bug compiler disk",
               "food": "bread soup cheese kitchen apple", "law": "judge court lawyer statute verdict"}
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _idx(path, a):
    a = np.asarray(a, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())


def make_sources(root):
    """Tiny stand-ins in each package's own format; returns build-corpora's path options."""
    rng = random.Random(1)
    fort = root / "fortunes"
    fort.mkdir()
    for topic, vocab in TOPIC_WORDS.items():
        entries = [" ".join(rng.choice(vocab.split() + WORDS) for _ in range(rng.randint(7, 14))) + f" {topic}{i}."
                   for i in range(20)]
        (fort / topic).write_text("\n%\n".join(entries) + "\n%\n")
        (fort / f"{topic}.dat").write_bytes(b"\0\1index")   # strfile's index: not a topic
    wn = root / "wordnet"
    wn.mkdir()
    for n, pos in enumerate(("noun", "verb", "adj", "adv")):
        lines = ["  1 This software and database is being provided to you, the LICENSEE"]
        for i in range(12):
            gloss = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10)))
            lines.append(f"{n:02d}{i:06d} 03 n 01 word{pos}{i} 0 000 | {gloss} {pos}{i}; \"an example\"")
        (wn / f"data.{pos}").write_text("\n".join(lines) + "\n")
    fm = root / "fashion"
    fm.mkdir()
    g = np.random.default_rng(0)
    for stem, n in (("train", 40), ("t10k", 20)):
        _idx(fm / f"{stem}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)))
        _idx(fm / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    rows = np.concatenate([g.integers(0, 17, (40, 64)), (np.arange(40) % 10)[:, None]], 1)
    with gzip.open(root / "digits.csv.gz", "wt") as f:
        f.write("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return ["--fortunes", str(fort), "--wordnet", str(wn), "--fashion-mnist", str(fm),
            "--digits", str(root / "digits.csv.gz")]


SMALL = ["--train", "10", "--test", "5", "--test-language", "5"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    opts = make_sources(root)
    assert main(["build-corpora", str(root / "out"), *opts, *SMALL]) == 0
    return root, opts


def _tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != "build.json":
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_the_build_is_seeded(built, tmp_path):
    root, opts = built
    assert main(["build-corpora", str(tmp_path / "a"), *opts, *SMALL]) == 0
    assert _tree_hash(tmp_path / "a") == _tree_hash(root / "out")
    assert main(["build-corpora", str(tmp_path / "b"), *opts, *SMALL, "--seed", "1"]) == 0
    assert _tree_hash(tmp_path / "b") != _tree_hash(root / "out")


def test_language_suite_loads_through_the_scorer_and_trains_from_commonsense_format(built):
    pytest.importorskip("lm_eval")
    from mambapeft.language import data
    from mambapeft.language import multiple_choice as mc
    from mambapeft.models import MambaForCausalLM
    from mambapeft.models.checkpoint import load_tokenizer
    suite = built[0] / "out" / "language"
    names = ["compare", "count", "fortune_topic", "wordnet_word"]
    assert sorted(p.stem for p in suite.glob("*.yaml")) == names
    tasks = [mc.load_task(str(suite / f"{n}.yaml")) for n in names]
    docs = mc.documents(tasks[2])
    assert len(docs) == 5 and all(len(args) == 4 for _, args in docs)   # four topics to choose from
    doc, args = docs[0]
    assert args[doc["label"]][1] == " " + doc["choices"][doc["label"]]   # target_delimiter ' '
    model, tok = MambaForCausalLM.from_pretrained(DEFAULT_MODEL).eval(), load_tokenizer(DEFAULT_MODEL)
    results = mc.evaluate(model, tok, tasks, batch_size=8)
    assert {k: v["n"] for k, v in results.items()} == dict.fromkeys(names, 5)
    assert all(0 <= v["acc"] <= 1 for v in results.values())
    records = data.read_records(suite / "train.json")
    assert len(records) == 40
    for r in records:   # the answer named in the output is one of the listed options
        assert r["output"] == f"the correct answer is {r['answer']}"
        assert r["answer"].capitalize() + ":" in r["instruction"]
    # a test item is scored on the prompt training puts its instruction in: context + the right
    # continuation is exactly the Alpaca prompt + the training output of the same item
    from mambapeft.default import language_suite
    import random as _random
    fortunes = {t: [f"{w} one two three four five six {t}{i}" for i in range(8)] for t, w in
                (("art", "paint"), ("law", "judge"), ("food", "bread"), ("love", "heart"))}
    for item in language_suite.fortune_topic(fortunes, _random.Random(0), 5) + \
            language_suite.count(_random.Random(0), 5):
        rec, test = language_suite.instruction(item), language_suite.test_item(item)
        assert test["query"] + " " + test["choices"][test["label"]] == data.prompt(rec) + rec["output"]
        assert test["options"] == item["choices"] and test["passage"] == item["passage"]
    for (doc, args), line in zip(docs, (suite / "fortune_topic.jsonl").read_text().splitlines()):
        row = json.loads(line)
        assert args[doc["label"]] == (row["query"], " " + row["choices"][row["label"]])
        assert row["query"].startswith(data.PROMPT_NO_INPUT.split("{")[0]) and \
            row["query"].endswith("### Response:\nthe correct answer is")
        assert [a[1] for a in args] == [f" answer{i + 1}" for i in range(len(args))]


def test_vision_suite_loads_in_the_vtab_layout(built):
    from mambapeft.vision.data import ImageDataset, open_vtab
    from mambapeft.default.vision_suite import GROUPS, PROCEDURAL
    suite = built[0] / "out" / "vision"
    assert sorted(p.name for p in suite.iterdir()) == sorted(GROUPS)
    for name in GROUPS:
        data = open_vtab(suite / name)
        assert {k: len(v) for k, v in data.splits.items()} == {"train800": 8, "val200": 2, "train800val200": 10,
                                                               "test": 5}
        assert data.num_classes <= (PROCEDURAL[name][1] if name in PROCEDURAL else 10)
        image, label = ImageDataset(data.split("test"), size=16)[0]
        assert image.shape == (3, 16, 16) and torch.isfinite(image).all()
        train = {s.path for s in data.split("train800val200")}
        assert not train & {s.path for s in data.split("test")}
    from mambapeft.training.task import build_task
    task = build_task({"type": "vision", "data": str(suite / "count"), "image_size": 16, "num_workers": 0}, "task")
    assert task.train_split == "train800val200" and task.splits == {"validation": None, "test": "test"}


def test_the_corpora_hold_no_test_item_and_the_check_catches_an_injected_one(built, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(built[0] / "out", out)
    corpora.check(out)
    text = (out / "corpus" / "text.jsonl").read_text()
    items = corpora.language_suite.test_passages(out / "language")
    passages = [p for _, p in items]
    fortunes = [p for at, p in items if "fortune_topic.jsonl" in at]
    assert fortunes and all(p not in text for p in passages)
    docs = [json.loads(line) for line in text.splitlines()]
    assert len({d["source"] for d in docs}) == len(TOPIC_WORDS) + 1   # every topic's other fortunes, and WordNet
    # a test fortune inside a longer document, with other spacing and case
    with open(out / "corpus" / "text.jsonl", "a") as f:
        f.write(json.dumps({"text": "Preface. " + fortunes[0].upper().replace(" ", "\n  "), "source": "x"}) + "\n")
    with pytest.raises(corpora.LeakError, match=r"fortune_topic\.jsonl:\d+ in .*text\.jsonl:\d+"):
        corpora.check(out)
    (out / "corpus" / "text.jsonl").write_text(text)
    corpora.check(out)
    # a vision test image put into the image corpus
    from PIL import Image
    from safetensors.torch import load_file
    line = (out / "vision" / "clothing" / "test.txt").read_text().splitlines()[3]
    img = np.array(Image.open(out / "vision" / "clothing" / line.split()[0]))
    arrays = load_file(str(out / "corpus" / "images.safetensors"))
    arrays["fashion_mnist"] = torch.cat([arrays["fashion_mnist"], torch.from_numpy(img)[None]])
    write_safetensors(out / "corpus" / "images.safetensors", arrays)
    found = corpora.leaks(out)
    assert [(at.endswith("clothing/test.txt:4"), where) for at, where in found] == \
        [(True, f"{out}/corpus/images.safetensors:fashion_mnist[{len(arrays['fashion_mnist']) - 1}]")]


def test_the_image_corpus_labels_stay_aligned_with_the_images(built):
    from safetensors.numpy import load_file
    root = built[0]
    arrays = load_file(str(root / "out" / "corpus" / "images.safetensors"))
    assert sorted(arrays) == ["digits", "digits_labels", "fashion_mnist", "fashion_mnist_labels"]
    fashion = sources.read_fashion_mnist(root / "fashion")
    given = {"fashion_mnist": [np.concatenate([fashion["train"][i], fashion["test"][i]]) for i in (0, 1)],
             "digits": sources.read_digits(root / "digits.csv.gz")}
    for name, (images, labels) in given.items():
        label_of = {images[i].tobytes(): int(labels[i]) for i in range(len(images))}   # random images: unique
        kept, kept_labels = arrays[name], arrays[name + corpora.LABELS]
        assert kept_labels.dtype == np.int64 and len(kept) == len(kept_labels) < len(images)   # test images left out
        assert kept_labels.tolist() == [label_of[a.tobytes()] for a in kept]


def test_the_text_corpus_leaves_out_a_document_that_quotes_a_test_item():
    passages = corpora.Passages([("t.jsonl:1", "one two three four five six seven")])
    docs = [{"text": "zero ONE two, three four five six! eight", "source": "a"},   # a 6-word window of it
            {"text": "one two three four five", "source": "b"},               # 5 words of it: kept
            {"text": "other words entirely here", "source": "c"}]
    with tempfile.TemporaryDirectory() as d:
        assert corpora.write_text_corpus(Path(d) / "t.jsonl", docs, passages) == (2, 1)
        assert [json.loads(x)["source"] for x in (Path(d) / "t.jsonl").read_text().splitlines()] == ["b", "c"]


@pytest.mark.parametrize("source, option, package", [
    ("fortunes", "--fortunes", "the Debian package fortunes"),
    ("wordnet", "--wordnet", "the Debian package wordnet-base"),
    ("fashion", "--fashion-mnist", "the Debian package dataset-fashion-mnist"),
    ("digits.csv.gz", "--digits", "the PyPI package scikit-learn"),
])
def test_a_missing_source_package_is_one_line_naming_it(built, tmp_path, capsys, source, option, package):
    opts = list(built[1])
    opts[opts.index(option) + 1] = str(tmp_path / "missing" / source)
    capsys.readouterr()
    assert main(["build-corpora", str(tmp_path / "out"), *opts, *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and package in err[0] and str(tmp_path / "missing" / source) in err[0], err
    assert not (tmp_path / "out").exists()   # every source is read before anything is written


def test_a_source_folder_missing_one_file_names_it(built, tmp_path, capsys):
    import shutil
    opts = list(built[1])
    wn = tmp_path / "wn"
    shutil.copytree(opts[opts.index("--wordnet") + 1], wn)
    (wn / "data.adv").unlink()
    opts[opts.index("--wordnet") + 1] = str(wn)
    assert main(["build-corpora", str(tmp_path / "out"), *opts, *SMALL]) == 2
    assert f"wordnet source {wn}/data.adv not found: install the Debian package wordnet-base" in capsys.readouterr().err



@pytest.mark.parametrize("damage", ["truncated", "not_gzip"])
def test_a_damaged_source_file_is_one_line(built, tmp_path, capsys, damage):
    import shutil
    opts = list(built[1])
    for option, name in (("--fashion-mnist", "train-labels-idx1-ubyte.gz"), ("--digits", None)):
        src = Path(opts[opts.index(option) + 1])
        copy = tmp_path / option.strip("-")
        if name is None:
            shutil.copy(src, copy)
            target = copy
        else:
            shutil.copytree(src, copy)
            target = copy / name
        data = target.read_bytes()
        target.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"plain text, not gzip")
        bad = list(opts)
        bad[bad.index(option) + 1] = str(copy)
        assert main(["build-corpora", str(tmp_path / f"out-{option}"), *bad, *SMALL]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mambapeft: error: {target}: ") and err.count("\n") == 1, err

INSTALLED = all(p.exists() for p in (sources.DEFAULTS["fortunes"][0], sources.DEFAULTS["wordnet"][0],
                                     sources.DEFAULTS["fashion_mnist"][0], sources._sklearn_digits()))


@pytest.mark.skipif(not INSTALLED, reason="needs the Debian packages fortunes, wordnet-base and "
                    "dataset-fashion-mnist, and scikit-learn")
def test_the_real_installed_sources(tmp_path):
    summary = corpora.build(tmp_path, n_train=20, n_test=10, n_test_language=10)
    assert summary["text_corpus"]["documents"] > 100_000 and summary["text_corpus"]["left_out"] >= 20
    assert summary["image_corpus"]["fashion_mnist"]["images"] + 10 <= 70_000
    assert corpora.leaks(tmp_path) == []


def test_asking_for_more_items_than_a_source_has_is_one_line(built, tmp_path, capsys):
    assert main(["build-corpora", str(tmp_path / "out"), *built[1], "--train", "100", "--test", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the suite needs 300 (100 train + 200 test)" in err[0], err
    assert "fortune_topic: the source gives" in err[0] and "lower --train or --test-language" in err[0], err
