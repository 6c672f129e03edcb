"""Model configurations. MambaConfig reads the fields of Hugging Face's MambaConfig."""
import math
from dataclasses import asdict, dataclass, field, fields

POSITIVE_INTS = ("vocab_size", "hidden_size", "state_size", "expand", "conv_kernel",
                 "time_step_rank", "img_size", "patch_size", "patch_stride", "in_chans", "num_classes")
POSITIVE_FLOATS = ("layer_norm_epsilon", "time_step_min", "time_step_max", "time_step_floor", "time_step_scale")


def check_fields(config):
    """Types and ranges of a model config's fields: a string where a boolean or number belongs (read
    from JSON) would be read wrongly or fail at the first forward, a negative epsilon gives NaN."""
    name = type(config).__name__
    for f in fields(config):
        v = getattr(config, f.name)
        low = getattr(config, "min_layers", 1) if f.name == "num_hidden_layers" else 1
        ints = POSITIVE_INTS + ("num_hidden_layers",)
        if f.name in ints and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise ValueError(f"{name}.{f.name} must be {'a positive' if low else 'a non-negative'} integer, got {v!r}")
        if f.name in POSITIVE_FLOATS and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                          or not math.isfinite(v)):
            raise ValueError(f"{name}.{f.name} must be a number > 0, got {v!r}")
        if f.type in (bool, "bool") and not isinstance(v, bool):
            raise ValueError(f"{name}.{f.name} must be true or false, got {v!r}")
    rate = getattr(config, "drop_path_rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"{name}.drop_path_rate must be a number in [0, 1), got {rate!r}")


@dataclass
class MambaConfig:
    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 24
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | str = "auto"
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.1
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_scale: float = 1.0
    # FalconMamba (model_type "falcon_mamba"): eps of the weightless RMS norms on the dt input, B and
    # C after x_proj. None is plain Mamba; adapters record it, so neither base takes the other's.
    mixer_rms_eps: float | None = None

    def __post_init__(self):
        if self.time_step_rank == "auto" and isinstance(self.hidden_size, int):
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        check_fields(self)

    @property
    def intermediate_size(self):
        return self.expand * self.hidden_size

    @property
    def model_type(self):
        return "mamba" if self.mixer_rms_eps is None else "falcon_mamba"

    @classmethod
    def preset(cls, name, **overrides):
        """The shape of a released model (random weights; for counts, tests and benchmarks)."""
        if name not in LM_SHAPES:
            raise ValueError(f"unknown model shape {name!r}; expected one of {', '.join(LM_SHAPES)}")
        return cls(**{**LM_SHAPES[name], **overrides})

    @classmethod
    def from_dict(cls, d, source="config"):
        """Read a Hugging Face MambaConfig dict or an original state-spaces/mamba config dict."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        if "d_model" in d:  # original state-spaces/mamba format
            missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in d]
            if missing:
                raise ValueError(f"{source}: original-format config lacks {', '.join(missing)}")
            ssm = d.get("ssm_cfg") or {}
            if not isinstance(ssm, dict):
                raise ValueError(f"{source}: ssm_cfg must be an object, got {ssm!r}")
            if ssm.get("layer", "Mamba1") not in ("Mamba1", "Mamba"):
                raise ValueError(f"{source}: ssm_cfg.layer={ssm['layer']!r}; only Mamba-1 is supported")
            vocab, mult = d["vocab_size"], d.get("pad_vocab_size_multiple", 1)
            if vocab % mult:
                vocab += mult - vocab % mult
            d = dict(vocab_size=vocab, hidden_size=d["d_model"], num_hidden_layers=d["n_layer"],
                     state_size=ssm.get("d_state", 16), conv_kernel=ssm.get("d_conv", 4),
                     expand=ssm.get("expand", 2), time_step_rank=ssm.get("dt_rank", "auto"),
                     use_bias=ssm.get("bias", False), use_conv_bias=ssm.get("conv_bias", True),
                     layer_norm_epsilon=d.get("norm_epsilon", 1e-5),
                     residual_in_fp32=d.get("residual_in_fp32", True),
                     tie_word_embeddings=d.get("tie_embeddings", True))
        elif "hidden_size" not in d:
            raise ValueError(f"{source}: not a Mamba config (expected 'hidden_size' as in Hugging Face "
                             "MambaConfig or 'd_model' as in state-spaces/mamba)")
        model_type = d.get("model_type", "mamba")
        if model_type == "falcon_mamba":
            d.setdefault("mixer_rms_eps", 1e-6)  # transformers' FalconMambaConfig default
            if not isinstance(d["mixer_rms_eps"], (int, float)) or d["mixer_rms_eps"] <= 0:
                raise ValueError(f"{source}: mixer_rms_eps={d['mixer_rms_eps']!r}; expected a positive number")
        elif model_type == "mamba":
            d.pop("mixer_rms_eps", None)
        else:
            raise ValueError(f"{source}: model_type={model_type!r}; expected 'mamba' (Mamba-1) or 'falcon_mamba'")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self):
        d = asdict(self)
        if self.mixer_rms_eps is None:
            del d["mixer_rms_eps"]
        arch = "MambaForCausalLM" if self.mixer_rms_eps is None else "FalconMambaForCausalLM"
        d.update(model_type=self.model_type, architectures=[arch],
                 intermediate_size=self.intermediate_size, hidden_act="silu", use_cache=True,
                 time_step_init_scheme="random", rescale_prenorm_residual=False)
        return d


LM_SHAPES = {   # state-spaces/mamba-*-hf and tiiuae/falcon-mamba-7b (N=16, expand 2, conv 4, R=ceil(D/16))
    "mamba-130m": dict(hidden_size=768, num_hidden_layers=24),
    "mamba-370m": dict(hidden_size=1024, num_hidden_layers=48),
    "mamba-790m": dict(hidden_size=1536, num_hidden_layers=48),
    "mamba-1.4b": dict(hidden_size=2048, num_hidden_layers=48),
    "mamba-2.8b": dict(hidden_size=2560, num_hidden_layers=64),
    "falcon-mamba-7b": dict(hidden_size=4096, num_hidden_layers=64, vocab_size=65024, tie_word_embeddings=False,
                            mixer_rms_eps=1e-6),
}


@dataclass
class VimConfig:
    """Vision Mamba (Vim) with a middle CLS token, as in hustvl/Vim-*-midclstok."""
    min_layers = 0   # no layers is a valid (test) model: norm_f of the CLS token
    img_size: int = 224
    patch_size: int = 16
    patch_stride: int | None = None  # None: equal to patch_size; 8 in the `*_stride8_*` (Vim-*+) releases
    in_chans: int = 3
    hidden_size: int = 384
    num_hidden_layers: int = 24
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | str = "auto"
    num_classes: int = 1000
    drop_path_rate: float = 0.1
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    use_bias: bool = False
    use_conv_bias: bool = True
    if_divide_out: bool = True  # output (g_f + flip(g_b)) / 2, as bimamba v2 with if_devide_out=True
    initializer_range: float = 0.02
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_scale: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.time_step_rank == "auto" and isinstance(self.hidden_size, int):
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if self.patch_stride is None:
            self.patch_stride = self.patch_size
        check_fields(self)
        if self.img_size < self.patch_size or (self.img_size - self.patch_size) % self.patch_stride:
            raise ValueError(f"VimConfig: img_size={self.img_size} does not fit a whole number of patches of "
                             f"size {self.patch_size} at stride {self.patch_stride}")

    @property
    def intermediate_size(self):
        return self.expand * self.hidden_size

    @property
    def grid_size(self):
        """Patches per side: (img - patch) / stride + 1, as hustvl/Vim's PatchEmbed."""
        return (self.img_size - self.patch_size) // self.patch_stride + 1

    @property
    def num_patches(self):
        return self.grid_size ** 2

    @classmethod
    def preset(cls, name, **overrides):
        presets = {"vim-tiny": dict(hidden_size=192), "vim-small": dict(hidden_size=384),
                   "vim-base": dict(hidden_size=768)}
        if name not in presets:
            raise ValueError(f"unknown Vim preset {name!r}; expected one of {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})
