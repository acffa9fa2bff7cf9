"""What this machine runs: versions of Python, torch, CUDA, the GPU and the libraries, which modules of the train and
eval path import, and which attention and faiss paths work on the device (each tried with a tiny call).

A stage of bench/gpu_check.py; prints one JSON object. Example:
    python bench/gpu_env.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

# What `python -m pretrain train` and `python -m evaluation knn` import (found by tracing both), then optional extras.
REQUIRED_MODULES = ("torch", "torchvision", "numpy", "PIL", "yaml", "omegaconf", "webdataset", "braceexpand",
                    "safetensors", "tensorboard", "tqdm", "timm")
OPTIONAL_MODULES = ("xformers", "faiss", "pyarrow", "transformers", "pytest", "pytest_timeout", "submitit",
                    "open_clip")
DISTRIBUTIONS = ("torch", "torchvision", "timm", "xformers", "faiss-gpu", "faiss-gpu-cu12", "faiss-cpu", "numpy",
                 "pillow", "omegaconf", "webdataset", "braceexpand", "pyarrow", "safetensors", "tensorboard",
                 "transformers", "pytest")
# Packed crops of the recipes: head dim 64 (S, L and g), the 224 px global and 98 px local crops at patch 14.
SDPA_SHAPES = ((2, 6, 257, 64), (4, 6, 50, 64))


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions(device: torch.device) -> dict:
    out: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available()
                 else None, "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = props.name
        out["gpu_count"] = torch.cuda.device_count()
        out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        out["compute_capability"] = f"{props.major}.{props.minor}"
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
        try:
            nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
            out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as e:  # a build without NCCL
            out["nccl"] = first_line(e)
    with contextlib.suppress(OSError):  # data-loader workers pass batches through it; containers often keep it small
        out["shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    out["cpu_count"] = os.cpu_count()
    for name in DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def imports() -> dict:
    """'ok' or the import error of each required module (and of xformers and faiss, whose builds often import
    badly); other optional modules are only looked up. Missing required modules are listed on their own."""
    result = {}
    for name in REQUIRED_MODULES + OPTIONAL_MODULES:
        if name in OPTIONAL_MODULES and name not in ("xformers", "faiss"):
            result[name] = "present" if importlib.util.find_spec(name) is not None else "missing"
            continue
        try:
            module = importlib.import_module(name)
            result[name] = f"ok {getattr(module, '__version__', '')}".strip()
        except Exception as e:  # a broken build raises more than ImportError
            result[name] = first_line(e)
    missing = [n for n in REQUIRED_MODULES if not result[n].startswith("ok")]
    return {"modules": result, "missing_required": missing}


def _status(works: bool, reason: str, **extra) -> dict:
    return {"status": "works" if works else "fails", "reason": reason, **extra}


def sdpa_backends(device: torch.device, dtype: torch.dtype) -> dict:
    """Forward + backward of each SDPA backend on packed-crop shapes; a backend that cannot run says why (torch
    gives its reasons as warnings before raising)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    out = {}
    for name, backend in backends.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    for shape in SDPA_SHAPES:
                        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                                   for _ in range(3))
                        F.scaled_dot_product_attention(q, k, v).float().sum().backward()
                _sync(device)
                out[name] = _status(True, f"forward+backward ran on {device} {str(dtype).removeprefix('torch.')}")
            except Exception as e:
                said = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
                out[name] = _status(False, "; ".join([first_line(e), *said[:3]])[:600])
    return out


ATTENTION_MODULES = ("dinoforge.models.attention", "dinoforge.models.attention")  # the model layer, before its move


def attention_paths(device: torch.device, dtype: torch.dtype) -> dict:
    """xformers' block-diagonal path (the model layer's own probe), the backend `auto` picks, and SDPA's kernels."""
    out: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    attention, error = None, ""
    for name in ATTENTION_MODULES:
        try:
            attention = importlib.import_module(name)
            break
        except ModuleNotFoundError as e:
            error = f"{name}: {first_line(e)}"
            if e.name != name:
                break
        except Exception as e:
            error = f"{name}: {first_line(e)}"
            break
    if attention is None:
        out["xformers"] = out["auto_backend"] = _status(False, error)
    else:
        out["module"] = attention.__name__
        probe = getattr(attention, "xformers_status", None)
        if probe is None:
            out["xformers"] = {"status": "unavailable", "reason": f"{attention.__name__} has no xformers_status"}
        else:
            try:
                out["xformers"] = _status(*probe(device, dtype))
            except Exception as e:
                out["xformers"] = _status(False, f"xformers_status raised {first_line(e)}")
        try:
            choose = getattr(attention, "choose_backend", None)
            if choose is not None:
                backend, why = choose("auto", device, dtype)
            else:
                backend, why = attention.resolve_backend("auto", device), ""
            out["auto_backend"] = {"backend": backend, "reason": why}
        except Exception as e:
            out["auto_backend"] = _status(False, first_line(e))
    out["sdpa"] = sdpa_backends(device, dtype)
    return out


FAISS_STATUS_MODULES = ("curate.knn.faiss_device", "curate.knn.graph")


def faiss_paths() -> dict:
    """faiss on GPU through curation's own smoke test (`faiss_gpu_status`), wherever it lives."""
    for name in FAISS_STATUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            return _status(False, f"{name} does not import: {first_line(e)}", module=name)
        except Exception as e:
            return _status(False, f"{name} does not import: {first_line(e)}", module=name)
        status = getattr(module, "faiss_gpu_status", None)
        if status is None:
            continue
        try:
            return _status(*status(), module=name)
        except Exception as e:
            return _status(False, f"faiss_gpu_status raised {first_line(e)}", module=name)
    return {"status": "unavailable", "reason": f"no faiss_gpu_status in {' or '.join(FAISS_STATUS_MODULES)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script
    report = {"versions": versions(device), "imports": imports(), "attention": attention_paths(device, dtype),
              "faiss": faiss_paths()}
    text = json.dumps(report, indent=2)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
