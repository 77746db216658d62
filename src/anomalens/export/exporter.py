"""Write a fitted detector as one ONNX / OpenVINO / TorchScript graph plus ``metadata.json``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalens.data.io import ImageLike, as_rgb_array, list_images
from anomalens.detectors.base import Detector
from anomalens.export.graphs import ExportError, build_graph, preprocessing_of
from anomalens.thresholds import Threshold

__all__ = [
    "EXPORT_FORMATS",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "METADATA_VERSION",
    "PRECISIONS",
    "QUANTIZE",
    "export_detector",
]

EXPORT_FORMATS = ("onnx", "openvino", "torchscript")
PRECISIONS = ("fp32", "fp16")
QUANTIZE = (None, "int8")
METADATA_FILE = "metadata.json"
METADATA_FORMAT = "anomalens-export"
#: Bumped when metadata.json or the graph's inputs/outputs change meaning.
METADATA_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("image_score", "anomaly_map")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
#: ONNX opset of the exported graphs (legacy TorchScript-based exporter, see _export_onnx).
OPSET = 17


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed for this export: pip install 'anomalens[{extra}]' ({exc})"
        ) from exc


def _threshold_record(detector: Detector, threshold: Threshold | float | None) -> dict | None:
    if threshold is None:
        if detector.default_threshold is None:
            return None
        threshold = Threshold(float(detector.default_threshold), None, "method-default")
    if not isinstance(threshold, Threshold):
        threshold = Threshold(float(threshold), None, "fixed")
    for v in (threshold.value, threshold.pixel_threshold):
        if not math.isfinite(float(v)):
            raise ValueError(f"threshold must be finite, got {v}")
    return threshold.to_dict()


def _jsonable(value: Any) -> Any:
    """Options as JSON: objects that are not plain data (a ready backbone) become their repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return f"<{type(value).__name__}>"


def _as_uint8_batch(images: Sequence[ImageLike], size: int, interpolation: str) -> np.ndarray:
    """Images squash-resized to (N, S, S, 3) uint8 exactly as ``to_batch`` resizes them."""
    from PIL import Image

    from anomalens.data.transforms import _PIL_FILTERS

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        arr = as_rgb_array(im)
        if arr.shape[:2] != (size, size):
            arr = np.asarray(Image.fromarray(arr).resize((size, size), _PIL_FILTERS[interpolation]))
        out[i] = arr
    return out


def _example_input(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, size, size, 3), generator=g, dtype=torch.uint8)


@contextlib.contextmanager
def _plain_attention() -> Iterator[None]:
    """Trace ``nn.MultiheadAttention`` through its plain operations: its fused inference
    kernel (``_native_multi_head_attention``) has no ONNX or TorchScript-trace equivalent."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def _index_add_symbolic(g: Any, self: Any, dim: Any, index: Any, source: Any, alpha: Any) -> Any:
    """``Tensor.index_add`` as ONNX ``ScatterElements(reduction="add")`` (opset >= 16).

    The exporter's own translation scatters without a reduction, which keeps only one of
    several updates of the same index (WinCLIP's harmonic window aggregation adds many).
    """
    from torch.onnx import symbolic_helper as sh

    axis = sh._get_const(dim, "i", "dim")
    rank = sh._get_tensor_rank(source)
    if rank is None:
        raise ExportError("index_add export needs the rank of its source tensor")
    shape = [1] * rank
    shape[axis] = -1
    idx = g.op("Reshape", index, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.long)))
    idx = g.op("Expand", idx, g.op("Shape", source))
    return g.op("ScatterElements", self, idx, source, axis_i=axis, reduction_s="add")


def _export_onnx(graph: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.onnx.export with a dynamic batch axis.

    The TorchScript-based exporter (``dynamo=False``) is used: with torch 2.14 it exports the
    MobileNetV2 PatchCore graph in ~5 s where the dynamo exporter takes ~50 s, with the same
    outputs (measured on this project's 2-core CI machine).
    """
    axes = {INPUT_NAME: {0: "N"}, OUTPUT_NAMES[0]: {0: "N"}, OUTPUT_NAMES[1]: {0: "N"}}
    with warnings.catch_warnings(), _plain_attention():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints of fixed shapes
        torch.onnx.register_custom_op_symbolic("aten::index_add", _index_add_symbolic, OPSET)
        try:
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
        finally:
            torch.onnx.unregister_custom_op_symbolic("aten::index_add", OPSET)


def _to_fp16_onnx(path: Path) -> None:
    onnx = _need("onnx", "onnx")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    # uint8 in, float32 out: the I/O contract does not change with the precision
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    onnx.save(half, str(path))


def _quantize_onnx(
    src: Path,
    dst: Path,
    method: str,
    calibration: np.ndarray | None,
) -> str:
    """int8 quantisation with onnxruntime: static (QDQ, calibrated) or dynamic (weights only).

    Only the backbone's convolutions (CNN methods) or matrix products (CLIP methods) are
    quantised; the scoring against the fitted state stays in float (a quantised nearest-neighbour
    search would move every score).

    Returns:
        ``"static"`` or ``"dynamic"``.
    """
    _need("onnxruntime", "onnx")
    from onnxruntime import quantization as q

    op_types = ["Conv"] if method in ("patchcore", "mvg") else ["MatMul", "Gemm"]
    if calibration is None:
        q.quantize_dynamic(
            str(src), str(dst), weight_type=q.QuantType.QInt8, op_types_to_quantize=op_types
        )
        return "dynamic"

    class _Reader(q.CalibrationDataReader):
        def __init__(self, batch: np.ndarray) -> None:
            self.items = iter([{INPUT_NAME: batch[i : i + 1]} for i in range(len(batch))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    q.quantize_static(
        str(src),
        str(dst),
        _Reader(calibration),
        quant_format=q.QuantFormat.QDQ,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        op_types_to_quantize=op_types,
        per_channel=True,
    )
    return "static"


def _check_onnx(path: Path, example: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    score, amap = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: example})
    return float(max(np.abs(score - ref[0]).max(), np.abs(amap - ref[1]).max()))


def export_detector(
    detector: Detector,
    out_dir: str | os.PathLike[str],
    format: str = "onnx",
    threshold: Threshold | float | None = None,
    precision: str = "fp32",
    quantize: str | None = None,
    calibration_images: Sequence[ImageLike] | str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Export a fitted detector as one graph + ``metadata.json`` in ``out_dir``.

    The graph maps uint8 images (N, S, S, 3) RGB at the detector's working size S to
    ``image_score`` (N,) and ``anomaly_map`` (N, S, S), float32; N is dynamic. Read it with
    :class:`anomalens.inference.OnnxInferencer` / ``OpenVinoInferencer`` (no PyTorch needed).

    Args:
        detector: a fitted detector (zero-shot ones are fitted with ``fit(None)`` if needed),
            built on the CPU in fp32.
        out_dir: output folder; written to a temporary sibling and renamed, so it is either
            complete or absent.
        format: ``onnx``, ``openvino`` (converted from the ONNX graph) or ``torchscript``.
        threshold: the decision threshold stored in the metadata (a ``Threshold`` from
            calibration or a value); None: the method's default, if it has one.
        precision: ``fp32`` or ``fp16`` (weights and activations in half precision: for GPU
            targets; onnx and openvino only).
        quantize: None or ``"int8"`` (onnx only): onnxruntime static quantisation calibrated
            on ``calibration_images``, or dynamic (weights only) quantisation without them.
        calibration_images: images (or a folder of them) for static int8 calibration; normal
            images of the product are the right choice.
        overwrite: replace an existing ``out_dir``.

    Returns:
        The output folder.

    Raises:
        ExportError: a method that cannot be exported (MuSc), an unfitted few-shot detector,
            bad options.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ImportError: the extra needed for the format is not installed (the message names it).
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(
            f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}"
        )
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if quantize not in QUANTIZE:
        raise ExportError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize is not None and format != "onnx":
        raise ExportError(
            f"quantize='int8' is done with onnxruntime: use format='onnx', not {format!r}"
        )
    if quantize is not None and precision != "fp32":
        raise ExportError("quantize='int8' starts from the fp32 graph: leave precision='fp32'")
    if precision == "fp16" and format == "torchscript":
        raise ExportError("precision='fp16' is supported for onnx and openvino exports")
    if calibration_images is not None and quantize is None:
        raise ExportError("calibration_images are used by quantize='int8' only")
    if format in ("onnx", "openvino"):
        _need("onnx", "onnx")
    if format == "openvino":
        _need("openvino", "openvino")

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass overwrite=True")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")

    threshold_rec = _threshold_record(detector, threshold)
    graph = build_graph(detector)
    prep = preprocessing_of(detector)
    size = prep["size"]
    calib: np.ndarray | None = None
    if quantize is not None and calibration_images is not None:
        if isinstance(calibration_images, (str, os.PathLike)):
            calibration_images = list_images(Path(calibration_images))
        if not calibration_images:
            raise ExportError("calibration_images is empty: give at least one normal image")
        calib = _as_uint8_batch(list(calibration_images), size, prep["interpolation"])

    example = _example_input(size)
    with torch.no_grad():
        ref = tuple(t.numpy() for t in graph(example))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model_file = MODEL_FILES[format]
        check: float | None = None
        quant_mode: str | None = None
        if format == "torchscript":
            with torch.no_grad(), warnings.catch_warnings(), _plain_attention():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(graph, (example,), check_trace=False)
            traced.save(str(tmp / model_file))
            with torch.no_grad():
                got = torch.jit.load(str(tmp / model_file))(example)
            check = float(max((got[i] - torch.from_numpy(ref[i])).abs().max() for i in range(2)))
        else:
            onnx_path = tmp / "model.onnx"
            _export_onnx(graph, example, onnx_path)
            if quantize is not None:
                fp32_path = tmp / "model.fp32.onnx"
                onnx_path.rename(fp32_path)
                quant_mode = _quantize_onnx(fp32_path, onnx_path, detector.name, calib)
                fp32_path.unlink()
            elif precision == "fp16":
                _to_fp16_onnx(onnx_path)
            if precision == "fp32" and quantize is None and _has("onnxruntime"):
                check = _check_onnx(onnx_path, example.numpy(), ref)
            if format == "openvino":
                ov = _need("openvino", "openvino")
                ov_model = ov.convert_model(str(onnx_path))
                ov.save_model(ov_model, str(tmp / model_file), compress_to_fp16=precision == "fp16")
                onnx_path.unlink()
        meta = _metadata(detector, format, model_file, prep, threshold_rec, precision, quantize)
        meta["quantization"] = quant_mode
        meta["export_check_max_abs_diff"] = check
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _metadata(
    detector: Detector,
    format: str,
    model_file: str,
    prep: dict[str, Any],
    threshold: dict | None,
    precision: str,
    quantize: str | None,
) -> dict[str, Any]:
    import anomalens

    s = prep["size"]
    return {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "method": detector.name,
        "runtime": format,
        "model_file": model_file,
        "precision": precision,
        "quantize": quantize,
        "image_size": s,
        "preprocessing": prep,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": ["N", s, s, 3],
            "channels": "RGB",
        },
        "outputs": [
            {"name": OUTPUT_NAMES[0], "dtype": "float32", "shape": ["N"]},
            {"name": OUTPUT_NAMES[1], "dtype": "float32", "shape": ["N", s, s]},
        ],
        "threshold": threshold,
        "settings": _jsonable(detector.config()),
        "init_options": _jsonable(detector.init_options),
        "versions": {
            "anomalens": anomalens.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "opset": OPSET if format in ("onnx", "openvino") else None,
    }
