"""The default's suites and models as the package ships them, so that a machine with only
`pip install` (no Debian packages) has them.

assets/suites/language/        the language suite's files exactly as build-corpora writes them
assets/suites/vision/TASK.safetensors.gz   per vision task, gzipped (the drawn images compress
                               well): uint8 images, (N, H, W) for mode L or (N, H, W, 3) for RGB, and
                               int64 labels of its training items (train800 then val200) and test items
assets/mamba-default/, assets/vim-default/   the pretrained base models (committed by the lead)

`vision_suite_dir()` writes the vision suite once in the VTAB-1k folder layout (PNG files and lists,
the same files build-corpora writes) into a cache folder and reuses it while it is intact.
`ship(build_dir)` regenerates the shipped copies from a build (`mambapeft build-corpora OUT --ship`)."""
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..io import atomic_path
from ..peft.config import ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SUITES = ASSETS / "suites"
LANGUAGE = SUITES / "language"
VISION = SUITES / "vision"
MODELS = {"mamba-default": "the small pretrained Mamba language model", "vim-default": "the small pretrained Vim",
          "tiny-mamba": "the tiny character-level Mamba of the toy task"}
MARK = ".mambapeft-suite.json"   # in a materialised suite: the digest of the packs it was written from


def model_path(name):
    """The folder of a shipped model; a one-line error when this installation does not have it."""
    path = ASSETS / name
    if not (path / "config.json").is_file():
        raise ConfigError(f"model: the shipped model {name} ({MODELS[name]}) is not in this installation "
                          f"({path} has no config.json); give a model directory with model.path")
    return str(path)


def resolve_model(path, default=None):
    """`path` as given when it exists (or is a hub id); a shipped model's name as its folder; None -> default."""
    if path is None:
        return model_path(default) if default else None
    if path in MODELS and not Path(path).exists():
        return model_path(path)
    return path


def language_suite_dir():
    if not (LANGUAGE / "train.json").is_file():
        raise ConfigError(f"task.suite: the shipped language suite is missing from this installation ({LANGUAGE})")
    return LANGUAGE


def language_tasks():
    """{task name: YAML path} of the shipped language suite."""
    return {p.stem: str(p) for p in sorted(language_suite_dir().glob("*.yaml"))}


# ---- the vision suite: pack and materialise --------------------------------------------------
def _read_split(folder, split):
    from PIL import Image
    images, labels, modes = [], [], set()
    for line in (folder / f"{split}.txt").read_text().splitlines():
        if line.strip():
            rel, label = line.rsplit(None, 1)
            with Image.open(folder / rel) as im:
                modes.add(im.mode)
                images.append(np.asarray(im))
            labels.append(int(label))
    if len(modes) != 1:
        raise ValueError(f"{folder}/{split}.txt: images of modes {sorted(modes)}; a pack holds one mode")
    return np.stack(images), np.asarray(labels, dtype=np.int64), modes.pop()


def pack_vision_task(folder, out_file):
    """One task folder of the VTAB-1k layout (as vision_suite.write_suite writes it) into one file."""
    from safetensors.numpy import save
    folder = Path(folder)
    train = [_read_split(folder, s) for s in ("train800", "val200")]
    test = _read_split(folder, "test")
    modes = {train[0][2], train[1][2], test[2]}
    if len(modes) != 1 or modes - {"L", "RGB"}:
        raise ValueError(f"{folder}: images of modes {sorted(modes)}; a pack holds L or RGB images")
    data = save({"train/images": np.concatenate([train[0][0], train[1][0]]),
                 "train/labels": np.concatenate([train[0][1], train[1][1]]),
                 "test/images": test[0], "test/labels": test[1]})
    with atomic_path(out_file) as tmp:
        tmp.write_bytes(gzip.compress(data, mtime=0))   # mtime 0: the same pack from the same suite


def read_vision_pack(path):
    """(train [(PIL image, label)], test [(PIL image, label)]) of a packed task."""
    from PIL import Image
    from safetensors.numpy import load
    t = load(gzip.decompress(Path(path).read_bytes()))
    mode = "RGB" if t["test/images"].ndim == 4 else "L"
    return tuple([(Image.fromarray(im, mode), int(y)) for im, y in zip(t[f"{s}/images"], t[f"{s}/labels"])]
                 for s in ("train", "test"))


def _packs(pack_dir):
    packs = sorted(Path(pack_dir).glob("*.safetensors.gz"))
    if not packs:
        raise ConfigError(f"task.suite: the shipped vision suite is missing from this installation ({pack_dir})")
    return packs


def _digest(packs):
    h = hashlib.sha256()
    for p in packs:
        h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _intact(folder, digest):
    """The suite at `folder` was written from packs with this digest, and its listed files are there."""
    try:
        mark = json.loads((folder / MARK).read_text())
    except (OSError, ValueError):
        return False
    if mark.get("digest") != digest:
        return False
    for name in mark.get("tasks", []):
        for split in ("train800", "val200", "train800val200", "test"):
            lst = folder / name / f"{split}.txt"
            if not lst.is_file():
                return False
            if not all((folder / name / line.rsplit(None, 1)[0]).is_file()
                       for line in lst.read_text().splitlines() if line.strip()):
                return False
    return True


def default_cache():
    base = os.environ.get("MAMBAPEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mambapeft")
    return Path(base) / "default-vision"


def vision_suite_dir(dest=None, pack_dir=None):
    """The shipped vision suite in the VTAB-1k layout: written once into `dest` (default: the cache
    folder, $MAMBAPEFT_CACHE/default-vision or ~/.cache/mambapeft/default-vision) and reused while
    intact. Written into a sibling folder first and renamed, so a killed write leaves no half suite."""
    from .vision_suite import write_suite
    packs = _packs(pack_dir or VISION)
    dest = Path(dest) if dest is not None else default_cache()
    digest = _digest(packs)
    if _intact(dest, digest):
        return dest
    if dest.exists() and any(dest.iterdir()) and not (dest / MARK).is_file():
        raise ConfigError(f"{dest}: holds other files, not a vision suite written by mambapeft; "
                          "remove it or choose another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tasks = {_task_name(p): read_vision_pack(p) for p in packs}
    write_suite(tmp, tasks)
    (tmp / MARK).write_text(json.dumps({"digest": digest, "tasks": sorted(tasks)}) + "\n")
    old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
    if dest.exists():   # a stale or damaged suite of ours: moved aside, then removed
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:   # another process put an intact one there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _intact(dest, digest):
            raise
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _task_name(pack):
    return pack.name[:-len(".safetensors.gz")]


def vision_tasks(pack_dir=None):
    return [_task_name(p) for p in _packs(pack_dir or VISION)]


# ---- regenerating the shipped copies ----------------------------------------------------------
def ship(build_dir, suites_dir=None):
    """Copy BUILD/language and pack BUILD/vision into the package's assets/suites (or `suites_dir`).
    Returns the files written."""
    build_dir, suites_dir = Path(build_dir), Path(suites_dir or SUITES)
    lang_out, vis_out = suites_dir / "language", suites_dir / "vision"
    written = []
    for folder in (lang_out, vis_out):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():   # a task that is no longer built must not stay shipped
            if old.is_file():
                old.unlink()
    for f in sorted((build_dir / "language").iterdir()):
        if f.is_file():
            with atomic_path(lang_out / f.name) as tmp:
                shutil.copyfile(f, tmp)
            written.append(lang_out / f.name)
    for task in sorted(p for p in (build_dir / "vision").iterdir() if p.is_dir()):
        pack_vision_task(task, vis_out / f"{task.name}.safetensors.gz")
        written.append(vis_out / f"{task.name}.safetensors.gz")
    return written
