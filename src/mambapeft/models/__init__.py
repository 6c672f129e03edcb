from .cache import MambaCache
from .config import MambaConfig, VimConfig
from .lm import MambaForCausalLM, MambaModel
from .vim import VisionMamba
from .mixer import Composed, MambaMixer, MixerAdapter, ScanTensors
from .adapter import ModelAdapter

__all__ = ["MambaCache", "MambaConfig", "VimConfig", "MambaForCausalLM", "MambaModel", "Composed",
           "MambaMixer", "MixerAdapter", "ScanTensors", "ModelAdapter", "VisionMamba"]
