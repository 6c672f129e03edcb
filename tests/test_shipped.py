"""The suites the package ships: equal to what build-corpora makes from the installed sources, with
no test item in the pretraining corpora, and the vision suite written once into the VTAB-1k layout
(reused while intact, rewritten when damaged)."""
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mambapeft-test-datasets-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from mambapeft.default import corpora, shipped, sources  # noqa: E402
from mambapeft.peft.config import ConfigError  # noqa: E402

INSTALLED = [n for n in ("fortunes", "wordnet", "fashion_mnist") if not sources.DEFAULTS[n][0].exists()]
if not sources._sklearn_digits().exists():
    INSTALLED.append("digits")
NEEDS_SOURCES = pytest.mark.skipif(bool(INSTALLED), reason="the shipped suites are compared with a build from the "
                                   "installed sources; missing: " + ", ".join(sources.DEFAULTS[n][1] for n in INSTALLED))


def _vision_tree(folder):
    """{task/list: lines} and {task/image: (mode, pixels)} of a suite in the VTAB-1k layout."""
    lists, images = {}, {}
    for lst in sorted(Path(folder).glob("*/*.txt")):
        lists[f"{lst.parent.name}/{lst.name}"] = lst.read_text()
    for png in sorted(Path(folder).glob("*/images/*.png")):
        with Image.open(png) as im:
            images[f"{png.parent.parent.name}/{png.name}"] = (im.mode, np.asarray(im).tobytes())
    return lists, images


@NEEDS_SOURCES
def test_the_shipped_suites_are_what_build_corpora_makes_and_no_test_item_is_in_a_corpus(tmp_path):
    build = tmp_path / "build"
    corpora.build(build)   # the defaults: what `mambapeft build-corpora OUT --ship` ships
    regenerate = "regenerate them: mambapeft build-corpora OUT --ship"
    built = sorted(p.name for p in (build / "language").iterdir())
    assert sorted(p.name for p in shipped.LANGUAGE.iterdir()) == built, regenerate
    for name in built:
        assert (shipped.LANGUAGE / name).read_bytes() == (build / "language" / name).read_bytes(), \
            f"{name} differs; {regenerate}"
    vision = shipped.vision_suite_dir(tmp_path / "vision")
    assert sorted(shipped.vision_tasks()) == sorted(p.name for p in (build / "vision").iterdir())
    assert _vision_tree(vision) == _vision_tree(build / "vision"), regenerate
    # the pretraining corpora of that build against the shipped copies
    check = tmp_path / "check"
    shutil.copytree(build / "corpus", check / "corpus")
    shutil.copytree(shipped.LANGUAGE, check / "language")
    shutil.copytree(vision, check / "vision")
    corpora.check(check)
    assert corpora.test_images(check / "vision") and corpora.language_suite.test_passages(check / "language")


def test_the_vision_suite_is_written_once_reused_and_rewritten_when_damaged(tmp_path):
    dest = tmp_path / "suite"
    assert shipped.vision_suite_dir(dest) == dest
    from mambapeft.vision.data import open_vtab
    for name in shipped.vision_tasks():
        data = open_vtab(dest / name)
        assert {k: len(v) for k, v in data.splits.items()} == {"train800": 800, "val200": 200,
                                                               "train800val200": 1000, "test": 500}
    lists, images = _vision_tree(dest)
    png = sorted(dest.glob("count/images/*.png"))[0]
    stamp = png.stat().st_mtime_ns
    assert shipped.vision_suite_dir(dest) == dest and png.stat().st_mtime_ns == stamp   # reused, not rewritten
    png.unlink()                                             # damaged: written again, whole
    shipped.vision_suite_dir(dest)
    assert _vision_tree(dest) == (lists, images)
    assert not [p for p in tmp_path.iterdir() if p.name != "suite"]   # no temporary folder left behind
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds other files"):
        shipped.vision_suite_dir(other)
    assert (other / "mine.txt").read_text() == "x"


def test_the_default_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAPEFT_CACHE", str(tmp_path / "c"))
    assert shipped.default_cache() == tmp_path / "c" / "default-vision"


def test_a_shipped_model_name_resolves_and_a_missing_one_is_one_line(tmp_path, monkeypatch):
    assert shipped.resolve_model("tiny-mamba") == str(shipped.ASSETS / "tiny-mamba")
    assert shipped.resolve_model(str(tmp_path)) == str(tmp_path)   # a path is taken as it is
    monkeypatch.setattr(shipped, "ASSETS", tmp_path)
    with pytest.raises(ConfigError, match=r"the shipped model vim-default .* is not in this installation"):
        shipped.resolve_model(None, "vim-default")
