"""The `mambapeft` command: one module per subcommand, each with `add_parser(subparsers)` and
`run(args)`. A user mistake ends as one line `mambapeft: error: ...` and exit status 2."""
import argparse
import importlib
import sys
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).parent.parent / "assets" / "tiny-mamba")
COMMANDS = ["methods", "generate", "train", "merge", "eval", "lm_eval", "vtab", "search", "build_corpora", "pretrain"]   # in --help order


class UsageError(ValueError):
    """A mistake in what the user asked for; printed as one line, exit status 2."""


def user_errors():
    """The exception types that mean "the user's input is wrong", not "the program is wrong"."""
    from ..io import CheckpointError
    from ..peft.config import ConfigError
    return (UsageError, CheckpointError, ConfigError, FileNotFoundError)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mambapeft", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(f".{name}", __name__) for name in COMMANDS}
    for module in modules.values():
        module.add_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:   # argparse leaves `key=value` overrides written after an option (train CFG --resume a=b)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        return modules[args.command.replace("-", "_")].run(args) or 0   # "lm-eval" is module lm_eval
    except user_errors() as e:
        print(f"mambapeft: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:   # a run that cannot go on (non-finite loss): one line, status 1
        from ..training.trainer import TrainingError
        if not isinstance(e, TrainingError):
            raise
        print(f"mambapeft: error: {e}", file=sys.stderr)
        return 1
