"""`python -m evaluation knn|linear|logreg --weights W --train DATA --val DATA [--config FILE] [key=value ...]`.

Runs single-process, under `torchrun` (features are extracted by all processes, the classifier runs on rank 0),
or as Slurm tasks. Writes config.yaml, results_<task>.json and results_<task>.md into --out (default
runs/eval/<name>) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from dinoforge.config import ConfigError, load_config
from dinoforge.data.dataset_spec import detect_kind, split_kind_prefix
from dinoforge.data.errors import DatasetError
from dinoforge.launch import destroy_distributed, init_distributed, is_distributed
from dinoforge.models import CheckpointError
from dinoforge.run_logging import setup_logging
from evaluation.config import TASK_SCHEMAS
from evaluation.evaluate import run_evaluation
from evaluation.results import render_markdown

# Bad paths, configs and weights files: reported on one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation",
        description="Evaluate a frozen backbone: k-NN, linear probe or logistic regression on its features.",
        epilog="Example: python -m evaluation knn --weights dinov2_vits14_pretrain.pth --train data/train "
               "--val data/val model.arch=vit_small model.patch_size=14 knn.ks=[10,20]",
    )
    parser.add_argument("task", choices=sorted(TASK_SCHEMAS), help="which evaluation to run")
    parser.add_argument("--weights", help="weights file (.pth / .safetensors), a pretrain run, export or release "
                        "folder (a release is checked against its SHA256SUMS), 'random' (a seeded random init of "
                        "model.*) or 'pixels' (the raw-pixel baseline: the crop averaged to 16x16x3); sets "
                        "model.weights")
    parser.add_argument("--train", help="labelled train dataset: ImageFolder dir, file list, WebDataset tar(s)")
    parser.add_argument("--val", help="labelled dataset to report accuracy on (same kinds as --train)")
    parser.add_argument("--config", help="YAML file of config values (e.g. configs/eval/knn.yaml)")
    parser.add_argument("--out", help="output directory (default runs/eval/<name>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.arch=vit_base features.batch_size=64")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    created_group = not is_distributed()
    env = init_distributed()
    created_group = created_group and is_distributed()
    setup_logging(rank=env.rank)
    try:
        try:
            cfg = load_config(TASK_SCHEMAS[args.task], args.config, args.overrides)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        # Flags are applied after parsing: paths such as `shard-{000..009}.tar` must not go through YAML.
        flags = {k: getattr(args, k) for k in ("train", "val", "out") if getattr(args, k) is not None}
        cfg = dataclasses.replace(cfg, **flags)
        if args.weights is not None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=args.weights))
        missing = [f"--{key}" for key in ("train", "val") if not getattr(cfg, key)]
        if missing:
            parser.error(f"{' and '.join(missing)} not given (labelled datasets; or set them in --config)")
        try:
            for key in ("train", "val"):
                _check_dataset(key, getattr(cfg, key))
            result = run_evaluation(cfg)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if result is not None:
            print(render_markdown(result))
        return 0
    finally:
        if created_group:
            destroy_distributed()


def _check_dataset(key: str, spec: str) -> None:
    """Refuse, before any model is built, a dataset path that cannot be a dataset (a stray file, an empty folder)."""
    kind, path = split_kind_prefix(spec)
    if kind is None:
        try:
            detect_kind(path)
        except (ValueError, OSError) as err:
            raise ConfigError(f"--{key}: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
