"""Studies on a shared storage and the worker loop that finishes exactly N trials per step.

Every worker runs the same command: the storage (SQLite by default, PostgreSQL for workers on
several machines) holds the study, so rerunning resumes it. Heartbeats mark a killed worker's trial
FAIL and RetryHeartbeatStaleTrialCallback puts a copy of it back in the queue."""
import time
import warnings
from dataclasses import asdict

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ..peft.config import ConfigError, PeftConfig
from .objective import Surplus, TrialFailed, make_objective
from .report import redact
from .space import NONE

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE whose random streams are re-seeded from (seed, trial number) before each trial, so one
    worker's search is reproducible and two workers never draw the same random startup trials."""

    def __init__(self, seed=0, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study, trial):
        seed = (self._base_seed * 1_000_003 + trial.number) % 2 ** 32
        self._rng.rng.seed(seed)                  # TPE's own draws
        self._random_sampler._rng.rng.seed(seed)  # the startup trials and independent fallbacks
        super().before_trial(study, trial)


def make_storage(s, attempts=3):
    """An RDBStorage with heartbeats for search settings `s` (any SQLAlchemy URL Optuna accepts)."""
    url = with_driver(s["storage"])
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():   # heartbeats are "experimental" in Optuna since 2.x
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=s["heartbeat_interval"],
                                  grace_period=s["grace_period"],
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(s["max_retry"]))
        except Exception as e:   # workers starting together race to create the tables: try again
            if attempt + 1 == attempts:   # a wrong URL, a server that is down: the user's to fix
                raise ConfigError(f"search.storage {redact(url)!r}: cannot open it ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
            time.sleep(1.0 + attempt)


def with_driver(url):
    """SQLAlchemy 2.1 reads postgresql:// as psycopg (3); we ship psycopg2-binary: use it when psycopg is absent."""
    import importlib.util
    if url.startswith(("postgresql://", "postgres://")) and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def make_pruner(p):
    if p["type"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p["startup_trials"], n_warmup_steps=p["warmup_steps"])
    if p["type"] == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p["min_resource"],
                                                      reduction_factor=p["reduction_factor"])
    return optuna.pruners.NopPruner()


def open_study(storage, name, s, direction):
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True,
                                sampler=TrialSeededTPE(seed=s["seed"]), pruner=make_pruner(s["pruner"]))
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} in {redact(s['storage'])} was made to {study.direction.name.lower()}, "
                          f"but these tasks {direction}: use another --study name")
    return study


def run_trials(study, objective, n_trials, max_failures=None, poll=None):
    """Run trials until exactly `n_trials` are COMPLETE or PRUNED, with any number of workers."""
    max_failures = max_failures or max(n_trials, 10)
    poll = poll or min(5.0, study._storage.get_heartbeat_interval() or 5.0)
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)   # a dead worker's trial: FAIL, and a retry queued
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        done, running = sum(s in FINISHED for s in states), states.count(TrialState.RUNNING)
        if done >= n_trials:
            return
        failed = sum("failed" in t.user_attrs for t in trials if t.state == TrialState.FAIL)
        if failed >= max_failures:   # failures do not count towards n_trials: do not loop for ever
            raise ConfigError(f"study {study.study_name!r}: {failed} trials failed (non-finite loss or out of "
                              f"memory) against {done} finished; see their 'failed' notes in the report "
                              "(search.max_failures raises the limit)")
        if done + running >= n_trials:   # the rest is in other workers' hands (or will be retried)
            time.sleep(poll)
            continue
        study.optimize(objective, n_trials=1, catch=(TrialFailed, Surplus), gc_after_trial=True)


def finished(study):
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))


def best_trial(study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"study {study.study_name!r} has no completed trial (every trial failed or was pruned)")
    return study.best_trial


def step1(workspace, space, storage, s):
    study = open_study(storage, f"{s['study']}.step1", s, workspace.direction)
    run_trials(study, make_objective(workspace, space.suggest_step1, s["trials"]["step1"]), s["trials"]["step1"],
               s["max_failures"])
    return study


def step2(workspace, space, storage, s):
    """Step 2 starts from step 1's best set by itself: the set is read from step 1's study, and the
    first trial is that set at its step-1 sizes."""
    s1 = optuna.load_study(study_name=f"{s['study']}.step1", storage=storage)
    if finished(s1) < s["trials"]["step1"]:
        raise ConfigError(f"step 2 needs step 1 finished: {finished(s1)} of {s['trials']['step1']} trials of "
                          f"{s['study']}.step1 are done; run --step 1 (or both) first")
    chosen = space.chosen_set(best_trial(s1).params)
    study = open_study(storage, f"{s['study']}.step2", s, workspace.direction)
    if "chosen" not in study.user_attrs:
        study.set_user_attr("chosen", chosen)
    elif study.user_attrs["chosen"] != chosen:
        raise ConfigError(f"study {s['study']}.step2 tunes {study.user_attrs['chosen']}, but step 1's best set "
                          f"is now {chosen}: use another --study name")
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(_start_params(space, chosen), skip_if_exists=True)
    suggest = lambda trial: space.suggest_step2(trial, chosen)  # noqa: E731
    run_trials(study, make_objective(workspace, suggest, s["trials"]["step2"]), s["trials"]["step2"], s["max_failures"])
    return study


def _start_params(space, chosen):
    """Step 2's parameters that reproduce step 1's best trial (each method at its minimal size)."""
    params = {"drop": NONE}
    for name in [*chosen, *space.always]:
        settings = asdict(PeftConfig({name: space.candidates.get(name) or space.always.get(name) or {}}).methods[name])
        for key in {**space.common, **(space.per_method.get(name) or {})}:
            if key in settings:
                params[f"{name}.{key}"] = settings[key]
    return params
