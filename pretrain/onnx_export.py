"""backbone.onnx for a release: the ViT's normalised tokens as an ONNX graph, checked against PyTorch with ONNX Runtime.

Exporter: torch.export in strict (Dynamo bytecode) mode, translated by `torch.onnx.export(dynamo=True)` (onnxscript).
The legacy TorchScript exporter (`dynamo=False`, deprecated in torch 2.9) cannot give a dynamic batch here: the
packed forward reads the batch size as a Python int (`TokenLayout.of`), which the tracer bakes into every Split and
Reshape. Non-strict torch.export specialises on the same int and refuses a dynamic batch; strict mode keeps it
symbolic. The exporter's lowest native opset is 18, hence the default: a lower one (>= 17) is down-converted by
onnx's C converter, which cannot convert an antialiased Resize and then keeps 18 (the report gives the file's opset).

Image size: the graph is exported with dynamic height and width from an example whose patch grid differs from the
trained one, so that it holds the position-embedding resize, and kept only when ONNX Runtime matches PyTorch at the
release size, the trained size and image_size + 2 patches (square and not). With `interpolate_offset=0` the resize
is exact at the trained grid (bicubic to the same size is the identity) and dynamic sizes work; DINOv2's legacy
offset (0.1, a scale-factor resize that PyTorch skips at the trained grid) is not reproduced by the graph, and the
file is then exported for the fixed release size, with the reason in the report (`fixed_image_size_reason`).

The file is deterministic: the exporter's per-node metadata (source stack traces, FX node text) and doc strings are
removed, intermediate shape annotations (`value_info`, with the exporter's symbol names) are dropped, and the input and
output dimensions get fixed names (batch, height, width, num_patches); the producer version (torch's) stays.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from dinoforge.atomic import atomic_write_bytes
from dinoforge.models.attention import BACKEND_ENV
from dinoforge.models.vision_transformer import DinoVisionTransformer

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4
INPUT = "pixel_values"
CLS, PATCHES, REGISTERS = "cls_token", "patch_tokens", "register_tokens"
DEFAULT_OPSET = 18
PROTOBUF_LIMIT = 2**31 - 1  # a single .onnx file (no external data) cannot be larger


class OnnxCheckError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance: the file must not be shipped."""


def require_runtime():
    """(onnx, onnxruntime), or ImportError with the install line."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the Dynamo exporter's translator)
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx, onnxruntime and onnxscript ({e.name} is missing): "
                          "pip install 'dinoforge[release]'") from None
    return onnx, onnxruntime


class _Tokens(nn.Module):
    """pixel_values -> (cls_token [B, D], patch_tokens [B, N, D][, register_tokens [B, R, D]]) of forward_features."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        out = self.backbone.forward_features(pixel_values)
        tokens = (out["x_norm_clstoken"], out["x_norm_patchtokens"])
        return (*tokens, out["x_norm_regtokens"]) if self.backbone.num_register_tokens else tokens


def export_onnx(model: DinoVisionTransformer, path: str | os.PathLike, image_size: int, opset: int = DEFAULT_OPSET,
                dynamic_image_size: bool = True) -> dict:
    """Export `model` (a copy, in eval mode, fp32 on CPU, PyTorch SDPA attention) to `path`, check it with ONNX Runtime
    against PyTorch and return the report (JSON-able; see the module docstring for the dynamic image size).

    Input `pixel_values` [batch, 3, H, W]; outputs `cls_token` [batch, D], `patch_tokens` [batch, N, D] and, with
    registers, `register_tokens` [batch, R, D]: the normalised tokens of `forward_features`. Raises OnnxCheckError
    with the figures when an output differs by more than 1e-4; nothing is written then. Written atomically.
    """
    _, ort = require_runtime()
    if opset < 17:
        raise ValueError(f"opset {opset}: backbone.onnx needs opset >= 17 (LayerNormalization)")
    if not isinstance(model, DinoVisionTransformer):
        raise TypeError(f"expected a DinoVisionTransformer, got {type(model).__name__}")
    if image_size <= 0 or image_size % model.patch_size:
        raise ValueError(f"image_size {image_size} is not a positive multiple of the patch size {model.patch_size}")
    size_bytes = 4 * sum(p.numel() for p in model.parameters())
    if size_bytes > PROTOBUF_LIMIT:
        raise ValueError(f"the backbone's fp32 weights take {size_bytes / 2**30:.1f} GiB: a single .onnx file holds "
                         "at most 2 GiB (protobuf); this release format has no external-data file")
    tokens = _Tokens(_cpu_fp32_copy(model)).eval()
    fixed_reason = "dynamic_image_size=False was asked"
    with _plain_attention(), _quiet_exporter():
        if dynamic_image_size:
            data, results, fixed_reason = _try_dynamic_size(ort, tokens, image_size, opset)
        if fixed_reason is not None:
            if dynamic_image_size:
                logger.info("backbone.onnx: fixed %dx%d input (%s)", image_size, image_size, fixed_reason)
            data = _export(tokens, image_size, dynamic_hw=False, opset=opset)
            results = _compare(ort, data, tokens, [(2, image_size, image_size), (1, image_size, image_size)])
    worst = max(r["max_abs_diff"] for r in results)
    if worst > TOLERANCE:
        raise OnnxCheckError(f"ONNX Runtime's outputs are {worst:.2e} away from PyTorch's (> {TOLERANCE}): "
                             f"{_describe(results)}; {Path(path).name} was not written")
    atomic_write_bytes(path, data)
    report = _report(Path(path), data, image_size, fixed_reason, results)
    if report["opset"] != opset:
        logger.warning("backbone.onnx: opset %d asked, the exporter wrote opset %d", opset, report["opset"])
    return report


def _try_dynamic_size(ort, tokens: _Tokens, image_size: int, opset: int) -> tuple[bytes, list[dict], str | None]:
    """(file, checks, None) when a graph with dynamic height and width matches PyTorch at the release size, the
    trained size and image_size + 2 patches (square and not); else (.., .., why not)."""
    backbone = tokens.backbone
    patch = backbone.patch_size
    trained = patch * math.isqrt(backbone.pos_embed.shape[1] - 1)
    # an example off the trained grid, so that the graph holds the position-embedding resize
    example = image_size + patch if image_size + patch != trained else image_size + 3 * patch
    wider = image_size + 2 * patch
    checks = list(dict.fromkeys([(2, image_size, image_size), (1, image_size, image_size), (2, trained, trained),
                                 (2, wider, wider), (1, image_size, wider)]))
    data, results, reason = b"", [], None
    try:
        data = _export(tokens, example, dynamic_hw=True, opset=opset)
        results = _compare(ort, data, tokens, checks)
    except Exception as e:  # any failure of the dynamic attempt means: export for the fixed size
        lines = str(e).strip().splitlines()
        reason = f"dynamic height/width failed: {type(e).__name__}: {lines[0] if lines else ''}"
    else:
        worst = max(r["max_abs_diff"] for r in results)
        if worst > TOLERANCE:
            reason = (f"dynamic height/width: outputs {worst:.2e} away from PyTorch (> {TOLERANCE}): "
                      f"{_describe(results)}")
    if reason and backbone.interpolate_offset:
        reason += (f" (interpolate_offset={backbone.interpolate_offset}: the legacy scale-factor resize of the "
                   "position embeddings is not reproduced by the exported graph)")
    return data, results, reason


def _cpu_fp32_copy(model: DinoVisionTransformer) -> DinoVisionTransformer:
    backbone = copy.deepcopy(model).to("cpu", torch.float32).eval().requires_grad_(False)
    backbone.set_attn_backend("sdpa")
    return backbone


@contextmanager
def _plain_attention() -> Iterator[None]:
    """PyTorch SDPA in every block even when DINOFORGE_ATTENTION (which overrides the model's choice) says
    otherwise: the graph must hold plain attention, not a CUDA-only kernel."""
    before = os.environ.get(BACKEND_ENV)
    if before in (None, "", "sdpa"):  # the copy's blocks already ask for SDPA
        yield
        return
    os.environ[BACKEND_ENV] = "sdpa"
    try:
        yield
    finally:
        os.environ[BACKEND_ENV] = before


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    with warnings.catch_warnings():
        # Dynamo traces through attention.choose_backend's functools.cache: harmless, the choice is constant here
        warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`")
        yield


def _export(tokens: _Tokens, size: int, dynamic_hw: bool, opset: int) -> bytes:
    """The cleaned ONNX bytes of `tokens` exported from a [2, 3, size, size] example."""
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_hw:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    with torch.no_grad():
        program = torch.export.export(tokens, (example,), dynamic_shapes={INPUT: dims}, strict=True)
    names = _output_names(tokens.backbone)
    onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT], output_names=names,
                                     opset_version=opset, optimize=True, verbose=False, report=False)
    proto = onnx_program.model_proto
    _clean(proto, dynamic_hw)
    return proto.SerializeToString()


def _output_names(backbone: DinoVisionTransformer) -> list[str]:
    return [CLS, PATCHES, REGISTERS] if backbone.num_register_tokens else [CLS, PATCHES]


def _clean(proto, dynamic_hw: bool) -> None:
    """Strip what varies between runs or machines (see the module docstring) and name the input/output axes."""
    proto.doc_string = ""
    del proto.metadata_props[:]
    for function in proto.functions:
        _clean_nodes(function.node)
    graph = proto.graph
    _clean_graph(graph)
    del graph.value_info[:]
    axes = {INPUT: {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"},
            CLS: {0: "batch"}, PATCHES: {0: "batch", 1: "num_patches"} if dynamic_hw else {0: "batch"},
            REGISTERS: {0: "batch"}}
    for value in [*graph.input, *graph.output]:
        shape = value.type.tensor_type.shape
        for index, dim in enumerate(shape.dim):
            name = axes[value.name].get(index)
            if name is not None:
                dim.dim_param = name
            elif not dim.HasField("dim_value"):
                raise RuntimeError(f"the exporter left axis {index} of {value.name} symbolic ({dim.dim_param!r}); "
                                   "expected a fixed size")


def _clean_graph(graph) -> None:
    graph.doc_string = ""
    del graph.metadata_props[:]
    for value in [*graph.input, *graph.output, *graph.initializer]:
        value.doc_string = ""
        del value.metadata_props[:]
    _clean_nodes(graph.node)


def _clean_nodes(nodes) -> None:
    for node in nodes:
        node.doc_string = ""
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _clean_graph(attribute.g)
            for sub in attribute.graphs:
                _clean_graph(sub)


def _compare(ort, data: bytes, tokens: _Tokens, checks: list[tuple[int, int, int]]) -> list[dict]:
    """ONNX Runtime (CPU) against PyTorch on seeded inputs of each (batch, height, width): max |diff| per check."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures come back as exceptions; the runtime's own log would repeat them
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = _output_names(tokens.backbone)
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch, height, width in checks:
        x = torch.randn(batch, 3, height, width, generator=generator)
        try:
            got = session.run(names, {INPUT: x.numpy()})
        except Exception as e:  # the runtime's own exception types (Fail, InvalidArgument, ...)
            lines = str(e).strip().splitlines()
            raise OnnxCheckError(f"ONNX Runtime failed at batch {batch}, {height}x{width}: "
                                 f"{lines[0] if lines else type(e).__name__}") from e
        with torch.no_grad():
            expected = tokens(x)
        diffs = {}
        for name, a, b in zip(names, got, expected, strict=True):
            if tuple(a.shape) != tuple(b.shape):
                raise OnnxCheckError(f"{name} has shape {tuple(a.shape)} from ONNX Runtime, {tuple(b.shape)} from "
                                     f"PyTorch at batch {batch}, {height}x{width}")
            diffs[name] = float((torch.from_numpy(a) - b).abs().max()) if b.numel() else 0.0
        results.append({"batch": batch, "height": height, "width": width, "max_abs_diff": max(diffs.values()),
                        "per_output": diffs})
    return results


def _describe(results: list[dict]) -> str:
    return "; ".join(f"batch {r['batch']} {r['height']}x{r['width']}: "
                     + ", ".join(f"{name} {diff:.2e}" for name, diff in r["per_output"].items()) for r in results)


def _report(path: Path, data: bytes, image_size: int, fixed_reason: str | None, results: list[dict]) -> dict:
    import onnx
    import onnxruntime

    proto = onnx.load_from_string(data)

    def shape(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dynamic(value) -> dict:
        return {str(i): d.dim_param for i, d in enumerate(value.type.tensor_type.shape.dim) if d.dim_param}

    values = [*proto.graph.input, *proto.graph.output]
    sizes = []
    for r in results:
        if [r["height"], r["width"]] not in sizes:
            sizes.append([r["height"], r["width"]])
    return {
        "file": path.name,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": {v.name: shape(v) for v in proto.graph.input},
        "outputs": {v.name: shape(v) for v in proto.graph.output},
        "dynamic_axes": {v.name: dynamic(v) for v in values if dynamic(v)},
        "dynamic_image_size": fixed_reason is None,
        "fixed_image_size_reason": fixed_reason,
        "image_size": image_size,
        "image_sizes_checked": sizes,
        "batch_sizes_checked": sorted({r["batch"] for r in results}),
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "tolerance": TOLERANCE,
        "checks": results,
        "onnxruntime_version": onnxruntime.__version__,
        "torch_version": torch.__version__,
    }
