"""`mambapeft lm-eval ...`: lm-evaluation-harness's own command line with the `mambapeft` model
registered (lm-eval 0.4.13 has no entry point through which an outside package could register it).
Every argument goes to the harness unchanged, e.g.
    mambapeft lm-eval --model mambapeft --model_args pretrained=DIR,adapter=DIR --tasks piqa"""
import argparse


def add_parser(sub):
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness's command line, with --model mambapeft available",
                       add_help=False, prefix_chars="\0")   # every option, --help included, is the harness's
    p.add_argument("harness_args", nargs=argparse.REMAINDER)


def run(args):
    import sys
    from lm_eval.__main__ import cli_evaluate
    from ..language import harness  # noqa: F401 - registers the model `mambapeft`
    saved = sys.argv
    sys.argv = ["lm-eval", *args.harness_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
