"""One JSON-serialisable configuration that turns on any subset of methods, each with its own
settings, learning-rate and weight-decay multipliers. Validation names what is allowed."""
import json
import math
from dataclasses import asdict, dataclass, field, fields


@dataclass
class Common:
    lr_mult: float = 1.0   # learning rate = base lr * lr_mult
    wd_mult: float = 1.0   # weight decay = base weight decay * wd_mult


@dataclass
class LoRA(Common):
    r: int = 8             # rank
    scale: float = 0.1     # plain scale s (no alpha / r)
    dropout: float = 0.1   # on the activation form (in_proj, X, Z, out_proj); merged forms have none
    dora: bool = False     # DoRA: learned per-row magnitude, merged form


@dataclass
class EmbedLoRA(Common):
    r: int = 8
    scale: float = 0.1
    dora: bool = False     # DoRA per token row (LM) or per output channel of the patch kernel (Vim)


@dataclass
class Partial(Common):
    wd_mult: float = 10.0  # the reference decays A, D and conv1d deltas 10x (dt bias 100x)


@dataclass
class Plain(Common):
    pass


@dataclass
class Prompt(Common):
    tokens: int = 8
    projection: bool = False   # Embedding -> Linear -> Tanh -> Linear reparameterisation
    hidden: int | None = None  # projection width (default D)


@dataclass
class Affix(Common):
    tokens: int = 3
    projection: bool = False
    hidden: int | None = None       # projection width (default: the token width, as the reference)
    position: str = "prefix"        # prefix or infix (before conv1d), outer (width-D tokens before in_proj)
    dual: bool = True               # Vim: each scan direction gets its own prefix
    store_z: bool = False           # keep the paper's 2E layout (the z half never gets gradient)


@dataclass
class AdditionalScan(Common):
    states: int = 6                 # n', extra state dimensions
    init: str = "copy_first"        # A_log_addi[:, j] = A_log[:, 0]; or "s4d" (N+1 .. N+n')
    position: str = "prefix"        # new states first (prefix) or last (suffix)


@dataclass
class ParallelAdapter(Common):
    r: int = 32
    scale: float = 0.1
    dropout: float = 0.1


@dataclass
class Spec:
    settings: type
    family: str
    help: str
    models: tuple = ("lm", "vim")
    defaults: dict = field(default_factory=dict)


METHODS = {
    "lora_in_proj": Spec(LoRA, "LoRA", "LoRA on the whole in_proj (activation form)"),
    "lora_out_proj": Spec(LoRA, "LoRA", "LoRA on out_proj (activation form)"),
    "lora_x_proj": Spec(LoRA, "LoRA", "LoRA on the whole x_proj (merged form; per direction in Vim)"),
    "lora_dt": Spec(LoRA, "LoRA", "LoRA on the dt_proj weight (merged form; per direction in Vim)"),
    "lora_embed": Spec(EmbedLoRA, "LoRA", "LoRA on the token embedding (LM) or the patch embedding (Vim)"),
    "lora_X": Spec(LoRA, "Partial LoRA", "LoRA on in_proj rows 0..E-1 (the x branch)"),
    "lora_Z": Spec(LoRA, "Partial LoRA", "LoRA on in_proj rows E..2E-1 (the z gate)"),
    "lora_d": Spec(LoRA, "Partial LoRA", "LoRA on the delta rows of x_proj"),
    "lora_B": Spec(LoRA, "Partial LoRA", "LoRA on the B rows of x_proj"),
    "lora_C": Spec(LoRA, "Partial LoRA", "LoRA on the C rows of x_proj"),
    "A": Spec(Partial, "Partial tuning", "additive delta on A_log"),
    "D": Spec(Partial, "Partial tuning", "additive delta on D"),
    "conv1d": Spec(Partial, "Partial tuning", "additive delta on the conv1d weight"),
    "bias": Spec(Partial, "Partial tuning", "additive delta on the dt_proj bias", defaults={"wd_mult": 100.0}),
    "cls": Spec(Partial, "Partial tuning", "additive delta on the CLS token", ("vim",), {"wd_mult": 1.0}),
    "pos": Spec(Partial, "Partial tuning", "additive delta on the position embedding", ("vim",), {"wd_mult": 1.0}),
    "prompt": Spec(Prompt, "Prompt tuning", "learned tokens in the residual stream"),
    "affix": Spec(Affix, "Affix tuning", "learned tokens prefixed to every mixer's sequence before conv1d"),
    "additional_scan": Spec(AdditionalScan, "Additional-scan", "extra learnable SSM state dimensions"),
    "parallel_adapter": Spec(ParallelAdapter, "Parallel adapter", "bottleneck adapter beside out_proj"),
    "full": Spec(Plain, "Baseline", "full fine-tuning: every base weight trains"),
    "head": Spec(Plain, "Baseline", "the classification head trains (alone: linear probing)", ("vim",)),
}
CHOICES = {("affix", "position"): ("prefix", "infix", "outer"), ("additional_scan", "position"): ("prefix", "suffix"),
           ("additional_scan", "init"): ("copy_first", "s4d")}


class ConfigError(ValueError):
    pass


def _check_setting(method, key, value, where):
    if key in ("r", "tokens", "states", "hidden"):
        if value is None and key == "hidden":
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}.{key} must be an integer >= 1, got {value!r}")
    elif key in ("scale", "lr_mult", "wd_mult", "dropout"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
        if key == "dropout" and not 0 <= value < 1:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {value!r}")
        if key in ("lr_mult", "wd_mult") and value < 0:
            raise ConfigError(f"{where}.{key} must be >= 0, got {value!r}")
    elif key in ("projection", "dora", "dual", "store_z"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
    elif (method, key) in CHOICES and value not in CHOICES[method, key]:
        raise ConfigError(f"{where}.{key}={value!r} does not exist; expected one of "
                          f"{', '.join(CHOICES[method, key])}")


@dataclass
class PeftConfig:
    methods: dict = field(default_factory=dict)   # name -> settings dataclass

    def __post_init__(self):
        self.methods = {name: self._settings(name, s) for name, s in self.methods.items()}

    @staticmethod
    def _settings(name, given):
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
        spec = METHODS[name]
        if isinstance(given, spec.settings):
            given = asdict(given)
        given = dict(given or {})
        allowed = [f.name for f in fields(spec.settings)]
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(f"methods.{name}: unknown setting(s) {', '.join(unknown)}; "
                              f"expected some of {', '.join(allowed)}")
        values = {**spec.defaults, **given}
        for key, value in values.items():
            _check_setting(name, key, value, f"methods.{name}")
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
        extra = sorted(set(d) - {"methods", "peft_type", "mambapeft_version", "base_model"})
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
