"""I-JEPA: models, masks, objective, checkpoints and training engine (plain Python + torch).

Nothing here reads configuration files or imports dvc, mlflow, hydra or submitit.
"""

from .checkpoint import CheckpointError, load_encoder, read_checkpoint, save_checkpoint
from .device import pick_device
from .jepa import JEPA
from .masks import MultiBlockMaskCollator
from .models import VisionTransformer, VisionTransformerPredictor, create_encoder, create_predictor, list_models

__version__ = "0.1.0"

__all__ = [
    "JEPA",
    "CheckpointError",
    "MultiBlockMaskCollator",
    "VisionTransformer",
    "VisionTransformerPredictor",
    "create_encoder",
    "create_predictor",
    "list_models",
    "load_encoder",
    "pick_device",
    "read_checkpoint",
    "save_checkpoint",
]
