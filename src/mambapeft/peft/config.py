"""One JSON-serialisable configuration that turns on any subset of methods, each with its own
settings, learning-rate and weight-decay multipliers. Validation names what is allowed."""
import json
from dataclasses import asdict, dataclass, field, fields

from .registry import METHODS, Spec
from .settings import ConfigError, check

__all__ = ["METHODS", "ConfigError", "PeftConfig", "Spec"]


@dataclass
class PeftConfig:
    methods: dict = field(default_factory=dict)   # name -> settings dataclass

    def __post_init__(self):
        if not isinstance(self.methods, dict):
            raise ConfigError(f"methods: expected an object mapping method names to settings, got {self.methods!r}")
        self.methods = {name: self._settings(name, s) for name, s in self.methods.items()}

    @staticmethod
    def _settings(name, given):
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
        spec = METHODS[name]
        if isinstance(given, spec.settings):
            given = asdict(given)
        if given is not None and not isinstance(given, dict):
            raise ConfigError(f"methods.{name}: expected an object of settings (e.g. {{}}), got {given!r}")
        given = dict(given or {})
        allowed = [f.name for f in fields(spec.settings)]
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(f"methods.{name}: unknown setting(s) {', '.join(unknown)}; "
                              f"expected some of {', '.join(allowed)}")
        values = {**spec.defaults, **given}
        check(spec.settings, values, f"methods.{name}")
        return spec.settings(**values)

    def validate_for(self, kind):
        """Errors for methods that do not apply to this model kind ("lm" or "vim")."""
        if not self.methods:
            raise ConfigError("the PEFT config turns on no method; expected at least one of "
                              + ", ".join(METHODS))
        for name, s in self.methods.items():
            if kind not in METHODS[name].models:
                ok = [n for n, spec in METHODS.items() if kind in spec.models]
                raise ConfigError(f"method {name!r} does not apply to a {'language' if kind == 'lm' else 'Vim'} "
                                  f"model; methods for it: {', '.join(ok)}")
        return self

    def to_dict(self):
        return {"methods": {name: asdict(s) for name, s in self.methods.items()}}

    @classmethod
    def from_dict(cls, d, source="config"):
        if not isinstance(d, dict) or not isinstance(d.get("methods"), (dict, list)):
            raise ConfigError(f"{source}: expected an object with a 'methods' object, e.g. "
                              '{"methods": {"lora_X": {"r": 64}}}')
        methods = d["methods"]
        if isinstance(methods, list):
            methods = {m: {} for m in methods}
        extra = sorted(set(d) - {"methods", "peft_type", "mambapeft_version", "base_model", "pair"})
        if extra:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(extra)}; expected 'methods'")
        try:
            return cls(methods)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text, source="config"):
        try:
            return cls.from_dict(json.loads(text), source)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
