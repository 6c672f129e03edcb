"""`mambapeft build-corpora OUT_DIR [--ship]`: the default's corpora and task suites from installed
packages; --ship also regenerates the copies of the suites the package ships (default/shipped.py)."""
from pathlib import Path

from . import UsageError


def add_parser(sub):
    p = sub.add_parser("build-corpora", help="build the text and image corpora and the task suites from installed "
                       "packages (fortunes, wordnet-base, dataset-fashion-mnist, scikit-learn)")
    p.add_argument("out_dir", help="folder to write corpus/, language/ and vision/ into")
    for name in ("fortunes", "wordnet", "fashion_mnist", "digits"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"path of the {name} source "
                       "(default: where its package installs it)")
    p.add_argument("--train", type=int, default=1000, help="training items per task (default 1000)")
    p.add_argument("--test", type=int, default=500, help="test images per vision task (default 500)")
    p.add_argument("--test-language", type=int, default=200, help="test items per language task (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ship", action="store_true", help="then copy the suites into the package's assets/suites "
                   "(the shipped copies; run from a source checkout, with the default sizes and seed)")


def run(args):
    from ..default import corpora
    if min(args.train, args.test, args.test_language) < 1 or args.train < 5:
        raise UsageError("--train, --test and --test-language: expected positive counts (--train at least 5)")
    paths = {k: getattr(args, k) for k in ("fortunes", "wordnet", "fashion_mnist", "digits") if getattr(args, k)}
    try:
        summary = corpora.build(args.out_dir, paths, args.train, args.test, args.test_language, args.seed)
    except corpora.LeakError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out_dir)
    t, i = summary["text_corpus"], summary["image_corpus"]
    print(f"language suite: {out / 'language'} ({len(summary['language_tasks'])} tasks, train.json)")
    print(f"vision suite: {out / 'vision'}")
    print(f"text corpus: {out / 'corpus' / 'text.jsonl'} ({t['documents']} documents, {t['left_out']} left out "
          "for sharing text with a test item)")
    print(f"image corpus: {out / 'corpus' / 'images.safetensors'} ("
          + ", ".join(f"{k} {v['images']} images, {v['left_out']} left out" for k, v in i.items()) + ")")
    print("no test item is in a corpus")
    if args.ship:
        from ..default import shipped
        if (args.train, args.test, args.test_language, args.seed) != (1000, 500, 200, 0):
            raise UsageError("--ship: the shipped suites are built with the default --train, --test, "
                             "--test-language and --seed; leave them out")
        written = shipped.ship(out)
        print(f"shipped suites: {shipped.SUITES} ({len(written)} files)")
