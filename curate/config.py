"""`CurateConfig`: the whole curation run in one dataclass, gathering the config of every step.

YAML files under `configs/curate/` choose values; `dinoforge.config.load_config` merges them strictly, then
`key=value` overrides (e.g. `dedup.threshold=0.5 partitions=64 index.kind=ivf index.nlist=64`). Relative paths
are relative to the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from curate.dedup.config import DedupConfig
from curate.embedding.config import EmbedConfig
from curate.knn.index import IndexConfig
from curate.report.writer import ReportConfig
from curate.selection.cluster import ClusterConfig
from curate.selection.retrieve import RetrieveConfig
from curate.shards.writer import ShardConfig
from curate.sources.ingest import IngestConfig, SourceConfig
from dinoforge.config import ConfigError, load_config

SELECT_METHODS = ("auto", "retrieve", "balanced", "all")


@dataclass
class SelectConfig:
    """Which deduplicated pool images end up in the shards.

    retrieve: images retrieved for the seed sets (DINOv2's LVD-142M recipe); balanced: `n_balanced` images drawn
    evenly across the cluster hierarchy (Vo et al. 2024), for pools without seeds; all: every deduplicated image;
    auto: retrieve when seed sources are configured, else balanced when `n_balanced` > 0, else all.
    """

    method: str = "auto"
    n_balanced: int = 0
    seed: int = 0


@dataclass
class CurateConfig:
    """A curation run: sources -> runs_root/name/ (manifest.parquet, embeddings/, dedup/, clusters/, shards/...)."""

    name: str = "default"
    runs_root: str = "runs/curate"
    partitions: int = 8  # embedding, dedup queries and shard writing split by a stable hash of the uid
    sources: list[SourceConfig] = field(default_factory=list)  # the pool being curated
    seeds: list[SourceConfig] = field(default_factory=list)  # seed sets for retrieval
    evals: list[SourceConfig] = field(default_factory=list)  # evaluation sets to decontaminate against
    ingest: IngestConfig = field(default_factory=IngestConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # clustering and retrieval (and dedup, see below)
    # Dedup and decontamination embedding. DINOv2 used a copy-detection network (SSCD) there and a semantic ViT
    # for retrieval; None: the `embed` embedding serves both.
    dedup_embed: EmbedConfig | None = None
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # How dedup's kNN graph, decontamination and retrieval index their embeddings: exact or IVF (curate.knn.index).
    index: IndexConfig = field(default_factory=IndexConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        # Thresholds belong to the embedding: unset ones take the defaults of the embedding dedup runs on.
        self.dedup.fill_default_thresholds((self.dedup_embed or self.embed).kind)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.name


def load_curate_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> CurateConfig:
    """Load and validate a curation config (strict keys, then the checks a schema cannot express)."""
    try:
        cfg = load_config(CurateConfig, path, overrides)
    except ConfigError:
        raise
    except ValueError as err:  # a step config's own check (__post_init__) refused a value
        raise ConfigError(f"{path or 'defaults'}: {err}") from None
    validate(cfg)
    return cfg


def validate(cfg: CurateConfig) -> None:
    """Raise ConfigError naming the key for values that cannot work."""
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"name={cfg.name!r}: the run name must be a plain folder name (no '/')")
    if cfg.partitions < 1:
        raise ConfigError(f"partitions={cfg.partitions}: must be >= 1")
    if not cfg.sources:
        raise ConfigError("sources: no pool source configured; add e.g. `sources: [{path: my/photos}]`")
    for key in ("sources", "seeds", "evals"):
        for i, src in enumerate(getattr(cfg, key)):
            if not src.path:
                raise ConfigError(f"{key}[{i}].path is empty")
    if cfg.select.method not in SELECT_METHODS:
        raise ConfigError(f"select.method={cfg.select.method!r}: use one of {', '.join(SELECT_METHODS)}")
    if cfg.select.method == "retrieve" and not cfg.seeds:
        raise ConfigError("select.method=retrieve needs seed sources: add `seeds: [{path: ...}]`")
    if cfg.select.method == "balanced" and cfg.select.n_balanced < 1:
        raise ConfigError("select.method=balanced needs select.n_balanced >= 1")
    if cfg.shards.max_count < 1 or cfg.shards.max_bytes < 1:
        raise ConfigError("shards.max_count and shards.max_bytes must be >= 1")
