"""medsyn: text-guided, anatomy-aware synthesis of 3D chest CT."""

from medsyn.nn.build import build_model, model_config

__version__ = "0.1.0"
__all__ = ["build_model", "model_config", "__version__"]
