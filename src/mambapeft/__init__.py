"""mambapeft: parameter-efficient fine-tuning of Mamba state space models."""
from .models import MambaConfig, MambaForCausalLM, VimConfig

__version__ = "0.1.0"
__all__ = ["MambaConfig", "MambaForCausalLM", "VimConfig"]
