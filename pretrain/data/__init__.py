"""Pretraining data: dataset readers (also used by evaluation), multi-crop, iBOT masks, collate, samplers, loader."""

from pretrain.data.collate import GlobalBatchCollator, collate_multicrop
from pretrain.data.datasets import ImageDataset, build_dataset
from pretrain.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from pretrain.data.errors import DatasetError
from pretrain.data.loader import DataConfig, build_pretrain_loader, build_pretrain_loader_from_config
from pretrain.data.masking import MaskingGenerator
from pretrain.data.multicrop import MultiCropAugmentation, MultiCropConfig, blur_probabilities
from pretrain.data.multicrop_dataset import MultiCropDataset
from pretrain.data.samplers import StepSampler
from pretrain.data.streaming import webdataset_stream

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DataConfig",
    "DatasetError",
    "GlobalBatchCollator",
    "ImageDataset",
    "ImageDecodeError",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropConfig",
    "MultiCropDataset",
    "StepSampler",
    "blur_probabilities",
    "build_dataset",
    "build_pretrain_loader",
    "build_pretrain_loader_from_config",
    "collate_multicrop",
    "decode_image",
    "webdataset_stream",
]
