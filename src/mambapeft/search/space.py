"""Search spaces as data: the shipped space.yaml, merged with a user's file, turned into Optuna
suggestions. Step 1 picks a set of methods at minimal sizes; step 2 tunes that set."""
import copy
from dataclasses import dataclass, fields
from pathlib import Path

from ..peft.config import METHODS, ConfigError, PeftConfig
from ..training.config import read_yaml

DEFAULT_SPACE = Path(__file__).with_name("space.yaml")
NONE = "none"   # the "drop" choice that keeps every method


def _merge(base, over):
    """Each field under step1/step2 that `over` gives replaces the shipped one as a whole (so a file
    with step1.candidates searches over exactly those candidates)."""
    out = copy.deepcopy(base)
    for step, fields_ in over.items():
        out[step] = {**(out.get(step) or {}), **copy.deepcopy(fields_)} if isinstance(fields_, dict) else fields_
    return out


@dataclass
class Space:
    candidates: dict      # step 1: method -> minimal settings
    always: dict          # methods on in every trial
    common: dict          # step 2: setting -> distribution
    per_method: dict      # step 2: method -> {setting: distribution}
    drop_one: bool

    @classmethod
    def load(cls, path=None, kind="lm"):
        """The shipped space, overridden by the file at `path`; methods that do not apply to a model
        of this kind ("lm" or "vim") are left out."""
        data = read_yaml(DEFAULT_SPACE)
        if path is not None:
            user = read_yaml(path)
            if not isinstance(user, dict) or not all(isinstance(v, dict) for v in user.values()):
                raise ConfigError(f"{path}: expected a mapping with step1 and/or step2 mappings")
            data = _merge(data, user)
        src = str(path or DEFAULT_SPACE)
        unknown = sorted(set(data) - {"step1", "step2"})
        if unknown:
            raise ConfigError(f"{src}: unknown field(s) {', '.join(unknown)}; expected step1, step2")
        s1, s2 = data.get("step1") or {}, data.get("step2") or {}
        fits = lambda name: kind in METHODS[name].models  # noqa: E731
        for where, section in (("step1.candidates", s1.get("candidates")), ("step1.always", s1.get("always"))):
            for name, settings in (section or {}).items():
                try:
                    PeftConfig({name: settings or {}})
                except ConfigError as e:
                    raise ConfigError(f"{src}: {where}: {e}") from None
        space = cls({k: v or {} for k, v in (s1.get("candidates") or {}).items() if fits(k)},
                    {k: v or {} for k, v in (s1.get("always") or {}).items() if fits(k)},
                    s2.get("common") or {}, s2.get("methods") or {}, bool(s2.get("drop_one", True)))
        for setting, dist in space.common.items():
            _check_dist(dist, f"{src}: step2.common.{setting}")
        for name, over in space.per_method.items():
            if name not in METHODS:
                raise ConfigError(f"{src}: step2.methods: unknown method {name!r}")
            for setting, dist in (over or {}).items():
                _check_dist(dist, f"{src}: step2.methods.{name}.{setting}")
        if not space.candidates:
            raise ConfigError(f"{src}: step1.candidates holds no method that applies to this model")
        return space

    # ---- step 1 ---------------------------------------------------------------------------
    def suggest_step1(self, trial):
        """{method: settings} of the methods this trial switches on, `always` included."""
        chosen = {name: dict(s) for name, s in self.candidates.items()
                  if trial.suggest_categorical(name, [False, True])}
        return {**chosen, **copy.deepcopy(self.always)}

    def chosen_set(self, params):
        """The methods step 1's parameters switched on (without `always`)."""
        return [name for name in self.candidates if params.get(name)]

    # ---- step 2 ---------------------------------------------------------------------------
    def suggest_step2(self, trial, chosen):
        """Settings for `chosen` (step 1's best set), `always` included; "drop" removes one of them."""
        droppable = [n for n in chosen if n not in self.always]
        dropped = NONE
        if self.drop_one and droppable and len(droppable) + len(self.always) > 1:
            dropped = trial.suggest_categorical("drop", [NONE, *droppable])
        methods = {}
        for name in [*chosen, *[a for a in self.always if a not in chosen]]:
            base = dict(self.candidates.get(name) or self.always.get(name) or {})
            allowed = {f.name for f in fields(METHODS[name].settings)}
            dists = {**self.common, **(self.per_method.get(name) or {})}
            for setting, dist in dists.items():
                if setting in allowed:
                    base[setting] = _suggest(trial, f"{name}.{setting}", dist)
            if name != dropped:   # suggested anyway: TPE sees one fixed set of parameters per study
                methods[name] = base
        return methods


def _check_dist(dist, where):
    if isinstance(dist, list):
        if not dist:
            raise ConfigError(f"{where}: an empty list of choices")
        return
    if not isinstance(dist, dict):
        return   # a fixed value
    unknown = sorted(set(dist) - {"low", "high", "step", "log"})
    if unknown or "low" not in dist or "high" not in dist:
        raise ConfigError(f"{where}: expected {{low, high}} with optional step or log, got {dist!r}")
    if not dist["low"] <= dist["high"]:
        raise ConfigError(f"{where}: low {dist['low']} is above high {dist['high']}")
    if dist.get("log") and dist["low"] <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {dist['low']}")


def _suggest(trial, name, dist):
    if isinstance(dist, list):
        return trial.suggest_categorical(name, dist)
    if not isinstance(dist, dict):
        return dist
    low, high, step, log = dist["low"], dist["high"], dist.get("step"), bool(dist.get("log", False))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step or 1)):
        return trial.suggest_int(name, low, high, step=step or 1, log=log)
    return trial.suggest_float(name, float(low), float(high), step=step, log=log)
