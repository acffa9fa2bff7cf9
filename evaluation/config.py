"""Config schemas of `python -m evaluation knn|linear|logreg` (loaded with `dinoforge.config.load_config`).

Defaults follow the DINOv2 evaluation protocol (resize 256 / crop 224 bicubic, k in 10/20/100/200 with T=0.07,
the linear-probe learning-rate grid, C in 10^linspace(-6, 5, 45)), except that one of our own models is evaluated at
the side it trained at (transform sizes 0 by default); YAML files in `configs/eval/` only choose values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dinoforge.data.transforms import EvalTransformConfig
from dinoforge.models.config import PretrainedModelConfig


@dataclass
class BackboneConfig(PretrainedModelConfig):
    """The backbone under evaluation: the training schema's architecture fields and defaults
    (`dinoforge.models.config.ModelConfig`, e.g. `layerscale`, `interpolate_offset`) and the weights to put in it."""

    layerscale: float | None = 1.0  # random init only: a usable baseline (see dinoforge.models.config)
    # The one default that differs from training's 224: the official DINOv2 weights carry a 37x37 position grid
    # (518 / 14), and weights load strictly, so the release checkpoints evaluate without any setting.
    img_size: int = 518


@dataclass
class FeatureConfig:
    """How features are extracted and cached."""

    batch_size: int = 128
    num_workers: int = 8
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    autocast_dtype: str = "bfloat16"  # used on CUDA only; "float32" turns autocast off
    cache_dir: str | None = "~/.cache/dinoforge/features"  # "" or null disables it; must be shared by all ranks


@dataclass
class KnnConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    n_per_class: list[int] = field(default_factory=list)  # few-shot train sizes; the full set is always evaluated
    n_tries: int = 1  # few-shot draws per size, seeds seed .. seed + n_tries - 1
    train_chunk_size: int = 65536  # train features on the device at once
    test_chunk_size: int = 4096


@dataclass
class LinearConfig:
    # Base rates, scaled by batch_size / 256 as in DINOv2's linear eval.
    learning_rates: list[float] = field(
        default_factory=lambda: [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]
    )
    n_last_blocks: list[int] = field(default_factory=lambda: [1, 4])
    avgpool: list[bool] = field(default_factory=lambda: [False, True])
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    holdout_fraction: float = 0.1  # of the train split, for choosing the head; the val split is never used for it
    refit: bool = True  # retrain the chosen head on the whole train split before the val measurement


@dataclass
class LogregConfig:
    c_log10_min: float = -6.0
    c_log10_max: float = 5.0
    c_steps: int = 45
    max_iter: int = 1000
    tolerance: float = 1e-9  # L-BFGS stops when the largest gradient entry falls below this
    dtype: str = "float64"  # float32 halves memory for very large train sets
    holdout_fraction: float = 0.1


@dataclass
class EvalRunConfig:
    """Fields shared by every evaluation command."""

    name: str = ""  # run name; default <task>_<weights file stem>
    train: str = ""  # dataset spec: ImageFolder dir, file list, WebDataset tar / brace pattern / shard dir
    val: str = ""
    out: str = ""  # default runs/eval/<name>
    seed: int = 0
    model: BackboneConfig = field(default_factory=BackboneConfig)
    # 0 (the default): the model's own side, see `evaluation.evaluate.model_transform`
    transform: EvalTransformConfig = field(default_factory=lambda: EvalTransformConfig(resize_size=0, crop_size=0))
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass
class KnnEvalConfig(EvalRunConfig):
    knn: KnnConfig = field(default_factory=KnnConfig)


@dataclass
class LinearEvalConfig(EvalRunConfig):
    linear: LinearConfig = field(default_factory=LinearConfig)


@dataclass
class LogregEvalConfig(EvalRunConfig):
    logreg: LogregConfig = field(default_factory=LogregConfig)


TASK_SCHEMAS: dict[str, type[EvalRunConfig]] = {
    "knn": KnnEvalConfig,
    "linear": LinearEvalConfig,
    "logreg": LogregEvalConfig,
}
