"""Datasets (CUB-200-2011, ILSVRC, Tiny ImageNet, image folder + boxes), transforms and batching.

See docs/data.md for the layouts, options, box conventions and the bad-input policy.
"""
from .archive import cache_dir, resolve_root, unpack_archive
from .datasets import (DATASET_NAMES, SkippedImages, SkippedSample, WSOLDataset, available_splits,
                       build_dataset, collate)
from .images import load_image
from ..errors import DatasetError
from .readers import Sample
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, train_resize_size

__all__ = [
    "DATASET_NAMES", "DatasetError", "EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD", "Sample", "SkippedImages",
    "SkippedSample", "TrainTransform", "WSOLDataset", "available_splits", "build_dataset", "cache_dir", "collate",
    "load_image", "resolve_root", "train_resize_size", "unpack_archive",
]
