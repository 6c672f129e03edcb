"""Method settings that document and check themselves: each field is declared with `setting()`,
which carries its help text (shown by `mambapeft methods`) and its check beside its type; the
type (int, float, bool, Literal choices, or None allowed) is checked from the annotation."""
import math
import typing
from dataclasses import MISSING, dataclass, field, fields


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be used; the message names the field."""


def setting(default, help, check=None):
    """A settings field: its default, one line of help, and `check(value) -> complaint or None`."""
    return field(default=default, metadata={"help": help, "check": check})


# checks, each returning what was expected when the value is wrong
def at_least_one(v):
    return None if v >= 1 else "an integer >= 1"


def non_negative(v):
    return None if v >= 0 else "a number >= 0"


def probability(v):
    return None if 0 <= v < 1 else "in [0, 1)"


@dataclass
class Common:
    lr_mult: float = setting(1.0, "learning rate = base lr * lr_mult", non_negative)
    wd_mult: float = setting(1.0, "weight decay = base weight decay * wd_mult", non_negative)


def describe(cls, defaults=None):
    """[(name, type text, default, help)] of a settings class, for `mambapeft methods`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        default = (defaults or {}).get(f.name, f.default if f.default is not MISSING else None)
        out.append((f.name, _type_text(hints[f.name]), default, f.metadata.get("help", "")))
    return out


def _type_text(t):
    args = typing.get_args(t)
    if typing.get_origin(t) is typing.Literal:
        return "|".join(args)
    if type(None) in args:
        return _type_text(next(a for a in args if a is not type(None))) + " or null"
    return {int: "int", float: "number", bool: "bool"}.get(t, getattr(t, "__name__", str(t)))


def _type_error(t, v):
    """What was expected, when `v` does not have type `t`; else None."""
    args = typing.get_args(t)
    if typing.get_origin(t) is typing.Literal:
        return None if v in args and type(v) is type(args[0]) else f"one of {', '.join(args)}"
    if type(None) in args:
        return None if v is None else _type_error(next(a for a in args if a is not type(None)), v)
    if t is bool:
        return None if isinstance(v, bool) else "true or false"
    if t is int:
        return None if isinstance(v, int) and not isinstance(v, bool) else "an integer"
    if t is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return None if ok else "a number"
    return None


def check(cls, values, where):
    """Raise ConfigError for the first value of `values` that its field refuses."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in values:
            continue
        v, t = values[f.name], hints[f.name]
        expected = _type_error(t, v)
        if expected is None and v is not None and f.metadata.get("check"):
            expected = f.metadata["check"](v)
        if expected is None:
            continue
        if typing.get_origin(t) is typing.Literal:
            raise ConfigError(f"{where}.{f.name}={v!r} does not exist; expected {expected}")
        if f.metadata.get("check") is at_least_one and expected == "an integer":
            expected = "an integer >= 1"
        raise ConfigError(f"{where}.{f.name} must be {expected}, got {v!r}")
