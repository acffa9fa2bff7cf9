"""Pretraining data (the dataset readers are in dinoforge.data): multi-crop, iBOT masks, collate, samplers, loader."""

from pretrain.data.collate import GlobalBatchCollator, collate_multicrop
from pretrain.data.loader import DataConfig, build_pretrain_loader, build_pretrain_loader_from_config
from pretrain.data.masking import MaskingGenerator
from pretrain.data.multicrop import MultiCropAugmentation, MultiCropConfig, blur_probabilities
from pretrain.data.multicrop_dataset import MultiCropDataset
from pretrain.data.samplers import StepSampler
from pretrain.data.streaming import webdataset_stream

__all__ = [
    "DataConfig",
    "GlobalBatchCollator",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropConfig",
    "MultiCropDataset",
    "StepSampler",
    "blur_probabilities",
    "build_pretrain_loader",
    "build_pretrain_loader_from_config",
    "collate_multicrop",
    "webdataset_stream",
]
