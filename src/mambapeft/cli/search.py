"""`mambapeft search`: the two-step hybrid PEFT search; several workers may run it on one study."""


def add_parser(sub):
    p = sub.add_parser("search", help="two-step hybrid PEFT search with Optuna (run it again to resume, "
                                      "or on more machines to add workers)")
    p.add_argument("config", help="search config YAML (model, task or tasks, training, output_dir, search)")
    p.add_argument("--storage", help="Optuna database URL (default: sqlite:///OUTPUT_DIR/study.db); "
                                     "postgresql://user:pass@host/db for workers on several machines")
    p.add_argument("--study", help="study name (default: search.study, else the config file's name)")
    p.add_argument("--trials", type=int, help="finished trials per step (overrides search.trials)")
    p.add_argument("--step", choices=["1", "2", "both"], default="both",
                   help="1: which methods; 2: how much, from step 1's best set; both (default)")
    p.add_argument("--no-test", action="store_true",
                   help="skip the final test-split evaluation (e.g. on all workers but one)")


def run(args):
    import logging

    import optuna

    from ..search import load_search_config, run_search
    from . import UsageError
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_search_config(args.config, storage=args.storage, study=args.study, trials=args.trials)
    paths = run_search(cfg, step=args.step, test=not args.no_test)
    for p in paths["best"]:
        print(f"best configuration: {p}")
    print(f"report: {paths['report']}")
