"""deco-export: DeCo models, checkpoint IO, exporters and the PyTorch backend."""

__version__ = "0.1.0"

from .config import DeCoConfig, get_preset
from .model import DeCo

__all__ = ["DeCo", "DeCoConfig", "__version__", "get_preset"]
