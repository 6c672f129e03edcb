"""Readers for the installed source data. Each source is a path inside a package; a missing one is a
one-line error naming the package to install. SOURCES.md records what each is and its licence."""
import gzip
import io
import importlib.util
import struct
from pathlib import Path

import numpy as np

from ..cli import UsageError


class SourceError(UsageError):
    """A source package that is not installed (or not where it was said to be)."""


def _sklearn_digits():
    spec = importlib.util.find_spec("sklearn")   # found, not imported: importing sklearn takes seconds
    root = Path(spec.origin).parent if spec and spec.origin else Path("/nonexistent/sklearn")
    return root / "datasets" / "data" / "digits.csv.gz"


# name -> (default path, how to install it)
DEFAULTS = {
    "fortunes": (Path("/usr/share/games/fortunes"), "the Debian package fortunes (apt-get install fortunes)"),
    "wordnet": (Path("/usr/share/wordnet"), "the Debian package wordnet-base (apt-get install wordnet-base)"),
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),
                      "the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"),
    "digits": (None, "the PyPI package scikit-learn (pip install scikit-learn==1.9.1)"),
}


def source_path(name, path=None):
    """The path of source `name` (given, or its default), checked to exist."""
    default, install = DEFAULTS[name]
    if path is None:
        path = _sklearn_digits() if name == "digits" else default
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{name} source {path} not found: install {install}, or pass its path")
    return path


# ---- text -------------------------------------------------------------------------------------
def read_fortunes(path=None):
    """{topic: [fortune text]} from a fortune-mod data folder: one file per topic, entries between
    lines holding '%'. Offensive-only folders (off/) and the .dat/.u8 index files are skipped."""
    folder = source_path("fortunes", path)
    topics = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.suffix in (".dat", ".u8") or f.name.startswith((".", "_")):
            continue
        text = f.read_bytes().decode("utf-8", errors="replace")
        entries = [e.strip() for e in text.replace("\r\n", "\n").split("\n%\n")]
        entries = [e.strip("%").strip() for e in entries]
        if entries := [e for e in entries if e]:
            topics[f.name] = entries
    if not topics:
        raise SourceError(f"fortunes source {folder}: no fortune files in it: install "
                          f"{DEFAULTS['fortunes'][1]}, or pass its path")
    return topics


def read_wordnet(path=None, pos=("noun", "verb", "adj", "adv")):
    """[(word, gloss)] from WordNet's data.* files: one synset per line, 'offset lex ss_type w_cnt
    word lex_id ... | gloss'; the synset's first word, the gloss without its examples (after ';')."""
    folder = source_path("wordnet", path)
    out = []
    for p in pos:
        f = folder / f"data.{p}"
        if not f.is_file():
            raise SourceError(f"wordnet source {f} not found: install {DEFAULTS['wordnet'][1]}, or pass its path")
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:   # the licence header lines start with spaces
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            word = fields[4].replace("_", " ")
            gloss = gloss.split(";")[0].strip()
            if gloss:
                out.append((word, gloss))
    return out


# ---- images -----------------------------------------------------------------------------------
def _gunzip(path):
    """The bytes of a gzip file; a damaged one is a one-line error (the package wants reinstalling)."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: not a readable gzip file ({e}); reinstall the package that ships it") from None


def _idx(path):
    """An IDX array (the MNIST format): magic 0 0 dtype ndim, big-endian sizes, then the data."""
    raw = _gunzip(path)
    if len(raw) < 4:
        raise SourceError(f"{path}: expected IDX data, got {len(raw)} bytes")
    _, _, dtype, ndim = raw[:4]
    if dtype != 0x08:
        raise SourceError(f"{path}: expected unsigned byte IDX data (type 0x08), got 0x{dtype:02x}")
    try:
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (struct.error, ValueError):
        raise SourceError(f"{path}: IDX data cut short (header for {ndim} dimensions, {len(raw)} bytes)") from None


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]


def read_fashion_mnist(path=None):
    """{"train": (images (N, 28, 28) uint8, labels (N,)), "test": (...)}."""
    folder = source_path("fashion_mnist", path)
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        files = [folder / f"{stem}-{k}-idx{n}-ubyte.gz" for k, n in (("images", 3), ("labels", 1))]
        for f in files:
            if not f.is_file():
                raise SourceError(f"fashion_mnist source {f} not found: install {DEFAULTS['fashion_mnist'][1]}, "
                                  "or pass its path")
        out[split] = (_idx(files[0]), _idx(files[1]))
    return out


def read_digits(path=None):
    """(images (N, 8, 8) uint8 in 0..255, labels (N,)) from scikit-learn's digits.csv.gz: 64 pixel
    values in 0..16 and the label per row."""
    f = source_path("digits", path)
    try:
        rows = np.loadtxt(io.StringIO(_gunzip(f).decode()), delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{f}: expected rows of 64 pixel values and a label ({e})") from None
    return (np.clip(rows[:, :64] * 16, 0, 255).astype(np.uint8).reshape(-1, 8, 8), rows[:, 64])
