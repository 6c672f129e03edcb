"""One registry of PEFT methods. Each method family is one module that registers its methods
with `register()`: the settings class, a one-line help, the model kinds it applies to, and
`attach(site, name, settings)`, which builds the method's modules and puts them on the model.
How a module merges is its own business (MixerAdapter.compose/fold, ModelAdapter.merge_into).

To add a method: write its module (settings class + adapter module + attach function + a
`register()` call) and add the module's name to FAMILIES below."""
import importlib
from dataclasses import dataclass, field
from typing import Callable

FAMILIES = ["lora", "partial", "prompt", "affix", "additional_scan", "parallel_adapter", "baseline"]


@dataclass
class Spec:
    settings: type
    family: str
    help: str
    models: tuple = ("lm", "vim")
    defaults: dict = field(default_factory=dict)
    attach: Callable | None = None        # attach(site, name, settings): puts the method's modules on
    base_params: Callable | None = None   # base_params(model): base tensors the method trains in place


METHODS: dict[str, Spec] = {}   # in the canonical order: families in FAMILIES order, then as registered


def register(name, settings, family, help, attach=None, models=("lm", "vim"), defaults=None, base_params=None):
    if name in METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    METHODS[name] = Spec(settings, family, help, tuple(models), dict(defaults or {}), attach, base_params)


class Site:
    """What an attach function sees of the model: its kind ("lm" or "vim"), backbone, mixers, and
    put(), which places an adapter module where the model looks for it."""

    def __init__(self, model, kind, backbone, put):
        self.model, self.kind, self.backbone = model, kind, backbone
        self.mixers = [layer.mixer for layer in backbone.layers]
        self.put = put   # put(peft ModuleDict, key, module, like): like = a base tensor it attaches to

    def per_mixer(self, name, make):
        """make(mixer) -> {key: MixerAdapter} for each mixer, put in its peft dict."""
        for m in self.mixers:
            for key, module in make(m).items():
                self.put(m.peft, key, module, m.in_proj.weight)

    def per_direction(self, name, make):
        """make(mixer, direction) -> MixerAdapter for each scan direction of each mixer ("_b" keys)."""
        self.per_mixer(name, lambda m: {name + sfx: make(m, d) for d, sfx in enumerate(m.directions)})


for _family in FAMILIES:
    importlib.import_module(f".{_family}", __package__)
