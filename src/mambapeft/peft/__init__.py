from .config import METHODS, ConfigError, PeftConfig
from .model import PeftModel, get_peft_model
from .presets import preset, preset_names

__all__ = ["METHODS", "ConfigError", "PeftConfig", "PeftModel", "get_peft_model", "preset", "preset_names"]
