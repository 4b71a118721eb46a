"""Semantic segmentation on I-JEPA encoders: data format, heads, training, dataset-level mIoU, inference."""

from .data import IGNORE, SegClasses, SegDataError, SegDataset, load_class_config, pair_files
from .metrics import ConfusionMatrix
from .model import SegmentationModel

__all__ = [
    "IGNORE",
    "ConfusionMatrix",
    "SegClasses",
    "SegDataError",
    "SegDataset",
    "SegmentationModel",
    "load_class_config",
    "pair_files",
]
