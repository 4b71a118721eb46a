"""Data: preparing WebDataset shards and streaming them for pretraining and evaluation."""

from .loaders import eval_loader, pretrain_loader
from .shards import labelled_splits, prepare_fashion_mnist, prepare_image_folder, read_manifest, shard_urls
from .sources import find_fashion_mnist
from .transforms import decode_image, eval_transform, pretrain_transform

__all__ = [
    "decode_image",
    "eval_loader",
    "eval_transform",
    "find_fashion_mnist",
    "labelled_splits",
    "prepare_fashion_mnist",
    "prepare_image_folder",
    "pretrain_loader",
    "pretrain_transform",
    "read_manifest",
    "shard_urls",
]
