"""Build the default's pretraining corpora and task suites from installed packages, and check that no
test item of a suite is in a corpus.

OUT/corpus/text.jsonl        {"text", "source"} per document: fortunes, then "word: gloss" lines of WordNet
OUT/corpus/images.safetensors  uint8 images per source: fashion_mnist (N, 28, 28), digits (N, 8, 8), and
                             their int64 class labels (0-9), row for row: fashion_mnist_labels, digits_labels
OUT/language/                the language suite (language_suite.py)
OUT/vision/                  the vision suite (vision_suite.py)

A corpus document that shares a 6-word window with a language test item is left out; an image equal
to a vision test image is left out. `check` reads what was written and fails on any overlap."""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_path, write_json, write_safetensors
from . import language_suite, sources, vision_suite

log = logging.getLogger(__name__)
WINDOW = 6   # words: a test passage shares no window this long with any corpus document


class LeakError(ValueError):
    """A suite's test item found in a pretraining corpus."""


# ---- text -------------------------------------------------------------------------------------
def _grams(text, n=WINDOW):
    w = language_suite.words(text)
    return {tuple(w)} if len(w) < n else {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


class Passages:
    """The test passages' word windows, and a test of whether a text shares one."""

    def __init__(self, passages):
        self.where = {}
        for at, p in passages:
            for g in _grams(p):
                self.where.setdefault(g, at)
        self.sizes = sorted({len(g) for g in self.where})

    def hit(self, text):
        """The test item (file:line) whose passage `text` shares a window with, or None."""
        w = language_suite.words(text)
        for n in self.sizes:
            for i in range(len(w) - n + 1):
                at = self.where.get(tuple(w[i:i + n]))
                if at is not None:
                    return at
        return None


def text_documents(fortunes, glosses):
    seen = set()
    for topic, entries in fortunes.items():
        for e in entries:
            if e not in seen:
                seen.add(e)
                yield {"text": e, "source": f"fortunes/{topic}"}
    for word, gloss in glosses:
        yield {"text": f"{word}: {gloss}", "source": "wordnet"}


def write_text_corpus(path, documents, passages):
    """Write the documents that share no window with a test passage; returns (kept, left out)."""
    kept = dropped = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for doc in documents:
            if passages.hit(doc["text"]):
                dropped += 1
                continue
            f.write(json.dumps(doc) + "\n")
            kept += 1
    return kept, dropped


# ---- images -----------------------------------------------------------------------------------
def _key(mode, size, data):
    return hashlib.sha1(f"{mode}{size}".encode() + data).hexdigest()


def image_key(im):
    return _key(im.mode, im.size, im.tobytes())


def test_images(suite_dir):
    """{key: "task/test.txt:line"} of every vision test image."""
    out = {}
    for lst in sorted(Path(suite_dir).glob("*/test.txt")):
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            if line.strip():
                with Image.open(lst.parent / line.rsplit(None, 1)[0]) as im:
                    out.setdefault(image_key(im), f"{lst}:{n}")
    return out


LABELS = "_labels"   # the labels of source NAME are stored under NAME + LABELS


def image_sources(arrays):
    """The image arrays of a corpus file's {name: array}, without the label arrays beside them."""
    return {k: v for k, v in arrays.items() if not k.endswith(LABELS)}


def write_image_corpus(path, arrays, test_keys):
    """arrays: {source: ((N, H, W) uint8 images, (N,) labels)}; rows equal to a test image are left
    out of both, so the labels stay aligned with the images. Returns counts."""
    kept, counts = {}, {}
    for name, (a, labels) in arrays.items():
        keep = [i for i in range(len(a)) if _key("L", (a.shape[2], a.shape[1]), a[i].tobytes()) not in test_keys]
        kept[name] = torch.from_numpy(np.ascontiguousarray(a[keep]))
        kept[name + LABELS] = torch.from_numpy(np.asarray(labels, dtype=np.int64)[keep])
        counts[name] = (len(keep), len(a) - len(keep))
    write_safetensors(path, kept)
    return counts


# ---- the check ----------------------------------------------------------------------------------
def leaks(out_dir):
    """[(test item, corpus document)] for every language test item found in OUT/corpus/text.jsonl and
    every vision test image found in OUT/corpus/images.safetensors (either may be absent)."""
    out_dir, found = Path(out_dir), []
    text, lang = out_dir / "corpus" / "text.jsonl", out_dir / "language"
    if text.is_file() and lang.is_dir():
        passages = Passages(language_suite.test_passages(lang))
        with open(text) as f:
            for n, line in enumerate(f, 1):
                at = passages.hit(json.loads(line)["text"])
                if at:
                    found.append((at, f"{text}:{n}"))
    images, vis = out_dir / "corpus" / "images.safetensors", out_dir / "vision"
    if images.is_file() and vis.is_dir():
        from safetensors.numpy import load_file
        keys = test_images(vis)
        for name, a in image_sources(load_file(str(images))).items():
            for i in range(len(a)):
                at = keys.get(_key("L", (a.shape[2], a.shape[1]), a[i].tobytes()))
                if at:
                    found.append((at, f"{images}:{name}[{i}]"))
    return found


def check(out_dir):
    found = leaks(out_dir)
    if found:
        raise LeakError(f"{len(found)} test items are in a pretraining corpus, the first: {found[0][0]} "
                        f"in {found[0][1]}")


# ---- the whole build ----------------------------------------------------------------------------
def build(out_dir, paths=None, n_train=1000, n_test=500, n_test_language=200, seed=0):
    """Read every source (paths: {source name: path}, defaults otherwise), write both suites, then both
    corpora without the suites' test items, then check. Returns a summary (also OUT/build.json)."""
    paths, out_dir = paths or {}, Path(out_dir)
    fortunes = sources.read_fortunes(paths.get("fortunes"))   # all sources first: a missing one stops early
    glosses = sources.read_wordnet(paths.get("wordnet"))
    fashion = sources.read_fashion_mnist(paths.get("fashion_mnist"))
    digits = sources.read_digits(paths.get("digits"))
    lang = language_suite.make_tasks(fortunes, glosses, n_train, n_test_language, seed)
    language_suite.write_suite(out_dir / "language", lang, seed)
    vision_suite.write_suite(out_dir / "vision", vision_suite.make_tasks(digits, fashion, n_train, n_test, seed))
    passages = Passages(language_suite.test_passages(out_dir / "language"))
    kept, dropped = write_text_corpus(out_dir / "corpus" / "text.jsonl", text_documents(fortunes, glosses), passages)
    counts = write_image_corpus(out_dir / "corpus" / "images.safetensors",
                                {"fashion_mnist": tuple(np.concatenate([fashion["train"][i], fashion["test"][i]])
                                                        for i in (0, 1)),
                                 "digits": digits}, test_images(out_dir / "vision"))
    check(out_dir)
    summary = {"seed": seed, "language_tasks": {k: {"train": len(a), "test": len(b)} for k, (a, b) in lang.items()},
               "text_corpus": {"documents": kept, "left_out": dropped},
               "image_corpus": {k: {"images": a, "left_out": b} for k, (a, b) in counts.items()},
               "sources": {k: str(sources.source_path(k, paths.get(k))) for k in sources.DEFAULTS}}
    write_json(out_dir / "build.json", summary)
    return summary
