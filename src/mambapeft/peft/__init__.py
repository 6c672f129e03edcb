from .config import METHODS, ConfigError, PeftConfig
from .frozen import cast_frozen
from .model import PeftModel, get_peft_model
from .presets import preset, preset_names

__all__ = ["METHODS", "ConfigError", "PeftConfig", "PeftModel", "cast_frozen", "get_peft_model", "preset",
           "preset_names"]
