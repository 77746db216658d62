"""``anomalens`` command line: fit, predict, export, benchmark, synth, demo, list, weights, train,
serve.

Building the parser imports no torch (choices come from ``anomalens.cli._names``), so ``--help``
and argument errors answer at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalens.cli._names import DATASETS, METHODS, SHOT_RULES

__all__ = ["build_parser", "load_config", "main"]

log = logging.getLogger("anomalens")

EPILOG = """examples:
  anomalens demo --out demo_out
  anomalens fit --method patchcore --normal good/ --out model/ --backbone mobilenet_v2
  anomalens predict --model model/ --images incoming/ --out results/
  anomalens predict --method patchcore --normal good/ --images incoming/ --out results/ \\
      --weights mobilenet_v2.safetensors --backbone mobilenet_v2
  anomalens benchmark --method patchcore --dataset mvtec --root /data/mvtec \\
      --categories bottle screw --shots 1 2 4 --seeds 10 20 30 --out bench/
  anomalens weights download wide_resnet50_2 --to weights/   (on a connected machine)
"""


# ----------------------------------------------------------------------------- help format
class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help.

    Only where the default is a value (not None or an off flag) and the help does not already
    state its default in words.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == argparse.SUPPRESS
            or isinstance(action, argparse._SubParsersAction)
            or "default" in text.lower()
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class _RawHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """The same, keeping the description and examples as written (the top-level help)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose sub-commands share the help format above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


# ----------------------------------------------------------------------------- config files
#: commands that take ``--config FILE``
CONFIG_COMMANDS = ("predict", "fit", "benchmark")
#: option destinations that a config file may not set
_NOT_IN_CONFIG = ("help", "config")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _config_actions(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of ``sub`` a config file may set, by destination name."""
    return {a.dest: a for a in sub._actions if a.option_strings and a.dest not in _NOT_IN_CONFIG}


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a YAML (``.yaml``/``.yml``, needs PyYAML) or JSON config file.

    Raises:
        SystemExit: the file is missing, unreadable, not a mapping, or YAML without PyYAML;
            the message names the file and the problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: config file {path}: cannot be read ({exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SystemExit(
                f"error: config file {path}: YAML needs PyYAML (pip install 'anomalens[config]'), "
                "or write the same settings as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SystemExit(f"error: config file {path}: not valid YAML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: config file {path}: not valid JSON ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SystemExit(
            f"error: config file {path}: expected a mapping of option names to values, "
            f"got {type(data).__name__}"
        )
    return data


def _config_tokens(
    path: str, data: dict[str, Any], sub: argparse.ArgumentParser, command: str
) -> list[str]:
    """Command-line tokens equivalent to the config ``data`` for the sub-command ``sub``.

    Keys are option names with ``-`` or ``_`` (``image-size``, ``image_size``); values are
    checked with the option's own type and choices, so an error names the file and the key.
    """
    actions = _config_actions(sub)
    items = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in items if k not in actions)
    if unknown:
        raise SystemExit(
            f"error: config file {path}: unknown key(s) {', '.join(unknown)} for "
            f"`anomalens {command}`. Known keys: {', '.join(sorted(actions))}"
        )
    tokens: list[str] = []
    for key, value in items.items():
        action = actions[key]
        flag = action.option_strings[-1]
        where = f"config file {path}: key {key!r}"
        if value is None:
            continue
        if action.nargs == 0:  # an on/off flag
            if not isinstance(value, bool):
                raise SystemExit(f"error: {where}: expected true or false, got {value!r}")
            if value != bool(action.default):
                tokens.append(flag)
            continue
        if isinstance(action, argparse._AppendAction) and isinstance(value, dict):
            values = [f"{k}={json.dumps(v)}" for k, v in value.items()]  # --option map
        elif isinstance(value, list):
            if action.nargs not in ("+", "*") and not isinstance(action, argparse._AppendAction):
                raise SystemExit(f"error: {where}: expected one value, got a list")
            values = [str(v) for v in value]
        else:
            if isinstance(value, dict):
                raise SystemExit(f"error: {where}: expected a value, got a mapping")
            values = [str(value)]
        for v in values:
            try:
                converted = action.type(v) if callable(action.type) else v
            except (TypeError, ValueError):
                name = getattr(action.type, "__name__", "value")
                raise SystemExit(f"error: {where}: invalid {name} value {v!r}") from None
            if action.choices is not None and converted not in action.choices:
                raise SystemExit(
                    f"error: {where}: {v!r} is not one of {', '.join(map(str, action.choices))}"
                )
        if isinstance(action, argparse._AppendAction):
            for v in values:
                tokens += [flag, v]
        else:
            tokens += [flag, *values]
    return tokens


def _expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the settings of its ``--config FILE`` inserted before the given flags.

    The file's settings come right after the command name, so flags on the command line,
    which argparse reads later, override them (a repeatable ``--option`` adds to the file's).
    """
    i = next((n for n, tok in enumerate(argv) if not tok.startswith("-")), None)
    if i is None or argv[i] not in CONFIG_COMMANDS:
        return argv
    rest = argv[i + 1 :]
    stop = rest.index("--") if "--" in rest else len(rest)
    path = None
    for n, tok in enumerate(rest[:stop]):
        if tok == "--config" and n + 1 < stop:
            path = rest[n + 1]
        elif tok.startswith("--config="):
            path = tok.split("=", 1)[1]
    if path is None:
        return argv
    sub = _subparser(parser, argv[i])
    assert sub is not None
    tokens = _config_tokens(path, load_config(path), sub, argv[i])
    return [*argv[: i + 1], *tokens, *rest]


def resolved_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Every option of the command as it was resolved (file, flags, defaults), for run.json.

    ``values`` is itself a valid config file for ``--config``: the same run again.
    """
    sub = _subparser(parser, args.command)
    actions = _config_actions(sub) if sub is not None else {}
    values = {k: getattr(args, k) for k in sorted(actions) if hasattr(args, k)}
    return {"file": getattr(args, "config", None), "values": values}


def _add_config_flag(p: argparse.ArgumentParser, recorded: bool = True) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of settings, keys named as the options (image_size: 224, "
        "option: {k: 3}); flags given on the command line override it"
        + ("; the resolved settings are written to OUT/run.json" if recorded else "")
        + " (default: none, flags only; see docs/cli.md)",
    )


# ----------------------------------------------------------------------------- status line
#: commands that take seconds or more before their first output
_LONG_COMMANDS = ("predict", "fit", "benchmark", "train", "demo", "serve")


def _status_line(args: argparse.Namespace) -> str:
    """What a long command is about to load (printed before any slow import)."""
    if args.command == "serve":
        return "anomalens serve: starting the inspection service (loading PyTorch)..."
    what = getattr(args, "method", None)
    if getattr(args, "model", None):
        what = f"the model {args.model}"
    elif what:
        what = f"the {what} detector"
    else:
        what = "the detector" if args.command != "demo" else "the demo"
    return f"anomalens {args.command}: loading PyTorch and {what}..."


# ----------------------------------------------------------------------------- helpers
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Constructor options from the common flags and repeated ``--option key=value``.

    Validated by ``anomalens.registry.check_options``, as the Python API and the service do.
    """
    from anomalens.registry import check_options

    kwargs: dict[str, Any] = {}
    for flag in ("backbone", "weights", "image_size", "device", "checkpoint", "precision"):
        v = getattr(args, flag, None)
        if v is not None:
            kwargs[flag] = v
    if getattr(args, "tf_padding", False):
        kwargs["tf_padding"] = True
    if getattr(args, "untrained", False):
        kwargs["untrained"] = True
    for item in getattr(args, "option", None) or []:
        if "=" not in item:
            raise SystemExit(f"error: --option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        kwargs[k.strip().replace("-", "_")] = _parse_value(v)
    try:
        opts = check_options(args.method, kwargs)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    from anomalens.backbones.weights import check_weight_file

    for key in ("checkpoint", "weights", "pretrained"):  # before anything is loaded
        try:
            check_weight_file(opts.get(key), f"--{key}")
        except FileNotFoundError as exc:
            raise SystemExit(f"error: {exc}") from None
    return opts


def _add_method_flags(
    p: argparse.ArgumentParser, default_method: str | None = None, required: bool | None = None
) -> None:
    g = p.add_argument_group("method")
    needed = default_method is None if required is None else required
    g.add_argument(
        "--method",
        required=needed,
        default=default_method,
        help=f"detector: {', '.join(METHODS)} (see `anomalens list methods`)"
        + ("" if needed or default_method else "; needed unless --model (default: none)"),
    )
    g.add_argument(
        "--backbone",
        help="backbone name, e.g. wide_resnet50_2, mobilenet_v2, ViT-L-14-336 (default: the "
        "method's own; see `anomalens list backbones`)",
    )
    g.add_argument(
        "--weights",
        help="backbone weights: local file, URL, hf-hub:ORG/REPO/FILE or a name from "
        "`anomalens weights list` (default: the backbone's standard pretrained weights)",
    )
    g.add_argument(
        "--checkpoint",
        help="method checkpoint: a file (e.g. from `anomalens train`) or a name from "
        "`anomalens weights list` (default for adaptclip / anomalyclip: the official one "
        "trained on MVTec AD, fetched and cached; none for the other methods)",
    )
    g.add_argument(
        "--untrained",
        action="store_true",
        help="adaptclip / anomalyclip: run with random adapters / prompts (tests only; marked "
        "in every output; default: refuse without trained ones)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        help="working resolution S: maps are S x S (default: the method's own)",
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    g.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        help="inference precision (default: the method's own, fp32 for most)",
    )
    g.add_argument(
        "--tf-padding",
        action="store_true",
        help="TensorFlow 'SAME' padding, for CNN weights converted from TensorFlow "
        "(e.g. a TF MobileNetV2)",
    )
    g.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="any other detector option (JSON values), repeatable, e.g. --option k=3 "
        "(default: the method's defaults, see docs/methods/)",
    )


def _add_threshold_flags(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("threshold (no labelled defects needed)")
    t.add_argument(
        "--threshold",
        type=float,
        help="fixed image-score threshold (default: none, set from the normal images)",
    )
    t.add_argument(
        "--pixel-threshold",
        type=float,
        help="fixed pixel threshold for masks (default: none, calibrated like the image one)",
    )
    t.add_argument(
        "--calibration",
        help="folder of extra normal images to calibrate on (default: none, leave-one-out on "
        "the --normal images)",
    )
    t.add_argument(
        "--percentile",
        type=float,
        help="percentile of normal scores (default 99 with --calibration, 100 = max for leave-one-out)",
    )
    t.add_argument(
        "--margin", type=float, default=1.0, help="multiplier on the percentile (default 1)"
    )
    v = p.add_argument_group("image geometry (every method; see docs/resolution.md)")
    v.add_argument(
        "--resize",
        choices=["squash", "letterbox"],
        help="how an image (or tile) becomes S x S: squash (aspect ratio lost) or letterbox "
        "(aspect ratio kept, padded) (default: squash)",
    )
    v.add_argument(
        "--roi",
        metavar="X,Y,W,H",
        help="score only this rectangle of each image, in pixels (default: the whole image)",
    )
    v.add_argument(
        "--tile",
        type=int,
        metavar="SIZE",
        help="cut each image into SIZE x SIZE pixel tiles scored as a batch, maps stitched "
        "(default: no tiling)",
    )
    v.add_argument(
        "--tile-overlap",
        type=float,
        metavar="F",
        help="overlap of neighbouring tiles, a fraction of SIZE in [0, 1) (default: 0.25)",
    )


def _image_views(args: argparse.Namespace) -> Any:
    """The ImageViews of --resize / --roi / --tile / --tile-overlap (None: none given)."""
    given = [getattr(args, k, None) for k in ("resize", "roi", "tile", "tile_overlap")]
    if all(x is None for x in given):
        return None
    from anomalens.geometry import views_from_options

    try:
        return views_from_options(*given)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


# ----------------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    from anomalens.registry import get_detector_class, list_detectors

    what = args.what
    if what in ("methods", "all"):
        print("methods:")
        for name in list_detectors():
            cls = get_detector_class(name)
            doc = (inspect.getdoc(cls) or "").splitlines()[0] if inspect.getdoc(cls) else ""
            print(f"  {name:<12} {cls.learning_type.value:<17} {doc}")
    if what in ("backbones", "all"):
        from anomalens.backbones.clip_presets import get_clip_preset, list_clip_presets
        from anomalens.backbones.presets import get_cnn_preset, list_cnn_presets

        rows = [(n, "CNN ", get_cnn_preset(n).description) for n in list_cnn_presets()]
        rows += [(n, "CLIP", get_clip_preset(n).description) for n in list_clip_presets()]
        width = max(len(n) for n, _, _ in rows)
        print("backbones (--backbone):")
        for name, kind, desc in rows:
            print(f"  {name:<{width}}  {kind}  {desc}")
        print(
            "  WinCLIP also takes any open_clip model: --option model_name=NAME --option pretrained=TAG"
        )
    if what in ("datasets", "all"):
        from anomalens.data.registry import list_datasets

        print("datasets:")
        for name in list_datasets():
            print(f"  {name}")
    return 0


def _images_of(folder: str, recursive: bool) -> list[Path]:
    from anomalens.data.io import list_images

    files = list_images(folder, recursive=recursive)
    if not files:
        raise SystemExit(
            f"error: no image file ({', '.join(('png', 'jpg', 'bmp', 'tif', 'webp'))}) in {folder}"
            + ("" if recursive else " (use --recursive for sub-folders)")
        )
    return files


def _inputs(args: argparse.Namespace, recursive: bool) -> list[Path]:
    """Images to inspect: ``--images DIR`` or ``--manifest FILE`` (one path per line)."""
    if getattr(args, "manifest", None):
        if args.images or args.groups:
            raise SystemExit("error: give either --images DIR or --manifest FILE (no --groups)")
        from anomalens.distributed.ray_predict import read_manifest

        return read_manifest(args.manifest)
    return _images_of(args.images, recursive)


def _predict_runner(args: argparse.Namespace) -> Any:
    """``run_predict`` (``run_predict_groups`` with ``--groups``), or its Ray version for
    ``--engine ray`` (see docs/scale.md)."""
    from anomalens.pipeline import run_predict, run_predict_groups

    if getattr(args, "engine", "local") != "ray":
        if (
            args.ray_address
            or args.workers is not None
            or args.gpus_per_worker
            or args.shard_size is not None
        ):
            raise SystemExit(
                "error: --ray-address, --workers, --gpus-per-worker, --shard-size need --engine ray"
            )
        return run_predict_groups if args.groups else run_predict
    import functools

    from anomalens.distributed import (
        RayOptions,
        require_ray,
        run_predict_groups_ray,
        run_predict_ray,
    )

    try:
        require_ray()
        options = RayOptions(
            address=args.ray_address,
            workers=2 if args.workers is None else args.workers,
            gpus_per_worker=args.gpus_per_worker or 0.0,
            shard_size=args.shard_size,
        )
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return functools.partial(
        run_predict_groups_ray if args.groups else run_predict_ray, options=options
    )


def _parquet_rows(args: argparse.Namespace) -> int | None:
    """Rows per Parquet shard for ``--parquet`` (None without it); pyarrow checked at once."""
    from anomalens.results_parquet import DEFAULT_ROWS_PER_SHARD, require_pyarrow

    if not getattr(args, "parquet", False):
        if getattr(args, "parquet_rows", None) is not None:
            raise SystemExit("error: --parquet-rows needs --parquet")
        return None
    rows = DEFAULT_ROWS_PER_SHARD if args.parquet_rows is None else args.parquet_rows
    if rows < 1:
        raise SystemExit(f"error: --parquet-rows must be at least 1, got {rows}")
    try:
        require_pyarrow()
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    return rows


def cmd_predict(args: argparse.Namespace) -> int:
    from anomalens.pipeline import ThresholdSpec, split_by_group
    from anomalens.registry import create_detector

    if args.model:
        return _predict_with_model(args)
    if not args.method:
        raise SystemExit("error: give --method (fit now) or --model (a model from `anomalens fit`)")
    kwargs = _method_kwargs(args)
    if args.pairs or args.reference_dir:
        return _predict_pairs(args, kwargs)
    if not args.images and not args.manifest:
        raise SystemExit("error: give --images DIR (or --pairs FILE / --reference-dir DIR)")
    if args.align != "none":
        raise SystemExit(
            "error: --align applies to reference-based runs (--pairs, --reference-dir)"
        )
    recursive = args.recursive or args.groups
    predict = _predict_runner(args)  # flags checked before any listing
    parquet_rows = _parquet_rows(args)
    normals = _images_of(args.normal, recursive) if args.normal else []
    images = _inputs(args, recursive)
    calibration = _images_of(args.calibration, recursive) if args.calibration else None
    spec = ThresholdSpec(
        fixed=args.threshold,
        pixel_fixed=args.pixel_threshold,
        calibration=calibration,
        percentile=args.percentile,
        margin=args.margin,
    )
    common: dict[str, Any] = {
        "threshold": spec,
        "batch_size": args.batch_size,
        "save_overlays": not args.no_overlays,
        "save_masks": not args.no_masks,
        "resume": not args.no_resume,
        "progress": not args.quiet,
        "title": f"anomalens {args.method}: {Path(args.images or args.manifest).name}",
        "config": getattr(args, "resolved_config", None),
        "parquet_rows": parquet_rows,
    }
    if args.object_name and args.class_names:
        raise SystemExit("error: give either --object-name or --class-names, not both")

    views = _image_views(args)

    def make_detector() -> Any:
        from anomalens.geometry import with_views

        return with_views(create_detector(args.method, **kwargs), views)

    if args.groups:  # one memory and threshold per sub-folder of --images / --normal
        summaries = predict(
            make_detector,
            split_by_group(args.images, images),
            args.out,
            normal_groups=split_by_group(args.normal, normals) if args.normal else None,
            calibration_groups=split_by_group(args.calibration, calibration)
            if calibration
            else None,
            class_names=args.class_names,
            category=args.object_name,
            **common,
        )
        index = Path(args.out) / "index.html"
    else:
        summaries = {
            "": predict(
                make_detector,
                images,
                args.out,
                normal_paths=normals,
                category=args.object_name,
                **common,
            )
        }
        index = Path(args.out) / "report.html"
    for group, s in summaries.items():
        print(
            f"{group + ': ' if group else ''}{s.num_scored} images scored, {s.num_anomalous} "
            f"anomalous (threshold {s.threshold.value:.6g}, {s.threshold.method}); "
            f"{s.num_errors} unreadable; {s.seconds:.1f} s"
        )
    print(f"results: {Path(args.out) / 'results.csv'}\nreport:  {index}")
    return 0


def _predict_pairs(args: argparse.Namespace, kwargs: dict[str, Any]) -> int:
    """``predict --pairs FILE`` / ``--reference-dir DIR``: each image against its own reference."""
    from anomalens.data.pairs import pairs_from_reference_dir, read_pairs_csv
    from anomalens.reference import PairsThreshold, run_predict_pairs
    from anomalens.registry import create_detector

    if args.pairs and args.reference_dir:
        raise SystemExit("error: give either --pairs or --reference-dir, not both")
    if _image_views(args) is not None:
        raise SystemExit(
            "error: --resize, --roi, --tile and --tile-overlap apply to --images runs; a "
            "reference-based run compares each image with its own reference as they are"
        )
    if args.groups or args.normal or args.calibration:
        raise SystemExit(
            "error: a reference-based run takes each image's own reference: --groups, --normal "
            "and --calibration do not apply (use --calibration-pairs FILE of known-good pairs)"
        )
    if args.parquet or args.parquet_rows is not None:
        raise SystemExit("error: --parquet applies to --images and --manifest runs")
    if args.pairs:
        pairs = read_pairs_csv(args.pairs)
        source = Path(args.pairs).name
    else:
        if not args.images:
            raise SystemExit("error: --reference-dir needs --images DIR")
        pairs = pairs_from_reference_dir(
            _images_of(args.images, args.recursive), args.images, args.reference_dir
        )
        source = Path(args.images).name
    spec = PairsThreshold(
        fixed=args.threshold,
        pixel_fixed=args.pixel_threshold,
        calibration=read_pairs_csv(args.calibration_pairs) if args.calibration_pairs else None,
        percentile=args.percentile if args.percentile is not None else 99.0,
        margin=args.margin,
    )
    s = run_predict_pairs(
        lambda: create_detector(args.method, **kwargs),
        pairs,
        args.out,
        align=args.align,
        threshold=spec,
        category=args.object_name,
        save_overlays=not args.no_overlays,
        save_masks=not args.no_masks,
        resume=not args.no_resume,
        progress=not args.quiet,
        title=f"anomalens {args.method} (reference-based): {source}",
        config=getattr(args, "resolved_config", None),
    )
    print(
        f"{s.num_scored} pairs scored, {s.num_anomalous} anomalous (threshold "
        f"{s.threshold.value:.6g}, {s.threshold.method}); {s.num_errors} not scored; "
        f"{s.seconds:.1f} s"
    )
    print(f"results: {Path(args.out) / 'results.csv'}\nreport:  {Path(args.out) / 'report.html'}")
    return 0


#: method flags that a model file fixes (``--device`` may still move it)
_MODEL_FIXED = ("method", "backbone", "weights", "checkpoint", "image_size", "precision", "option")


def _threshold_spec(args: argparse.Namespace, calibration: list[Path] | None) -> Any:
    from anomalens.pipeline import ThresholdSpec

    return ThresholdSpec(
        fixed=args.threshold,
        pixel_fixed=args.pixel_threshold,
        calibration=calibration,
        percentile=args.percentile,
        margin=args.margin,
    )


def _print_summaries(summaries: dict[str, Any], out: str, index: Path) -> None:
    for group, s in summaries.items():
        print(
            f"{group + ': ' if group else ''}{s.num_scored} images scored, {s.num_anomalous} "
            f"anomalous (threshold {s.threshold.value:.6g}, {s.threshold.method}); "
            f"{s.num_errors} unreadable; {s.seconds:.1f} s"
        )
    print(f"results: {Path(out) / 'results.csv'}\nreport:  {index}")


def _predict_exported(args: argparse.Namespace, model: Path) -> int:
    """``predict --model EXPORTED_DIR``: run an exported graph with the torch-free inferencer."""
    from anomalens.inference import load_inferencer, run_folder

    refused = [
        flag
        for flag, on in (
            ("--threshold", args.threshold is not None),
            ("--pixel-threshold", args.pixel_threshold is not None),
            ("--calibration", bool(args.calibration)),
            ("--manifest", bool(getattr(args, "manifest", None))),
            ("--engine ray", getattr(args, "engine", "local") == "ray"),
            ("--parquet", bool(getattr(args, "parquet", False))),
        )
        if on
    ]
    if refused:
        raise SystemExit(
            f"error: {', '.join(refused)} cannot be used with an exported model ({model}): its "
            "threshold is fixed in metadata.json; export again to change it"
        )
    rows = run_folder(
        load_inferencer(model),
        args.images,
        args.out,
        batch_size=args.batch_size,
        save_overlays=not args.no_overlays,
        save_masks=not args.no_masks,
        recursive=args.recursive,
    )
    n_anom = sum(r.get("decision") == "anomalous" for r in rows)
    print(
        f"{len(rows)} images scored with the exported model {model.name}, {n_anom} anomalous; "
        f"results: {Path(args.out) / 'results.csv'}"
    )
    return 0


def _predict_with_model(args: argparse.Namespace) -> int:
    """``predict --model``: score with a fitted model file, no refit."""
    from anomalens.model_file import model_kind
    from anomalens.pipeline import load_model_for_predict, split_by_group

    given = [f"--{f.replace('_', '-')}" for f in _MODEL_FIXED if getattr(args, f, None)]
    given += ["--tf-padding"] if getattr(args, "tf_padding", False) else []
    given += [
        f"--{f.replace('_', '-')}"
        for f in ("resize", "roi", "tile", "tile_overlap")
        if getattr(args, f, None) is not None
    ]
    given += ["--normal"] if args.normal else []
    given += ["--object-name"] if args.object_name else []
    given += ["--class-names"] if args.class_names else []
    given += ["--pairs"] if args.pairs else []
    given += ["--reference-dir"] if args.reference_dir else []
    if given:
        raise SystemExit(
            f"error: {', '.join(given)} cannot be used with --model: the model file fixes the "
            "method, its settings, its normal images and its object name (fit a new model with "
            "`anomalens fit` to change them)"
        )
    if not getattr(args, "images", None) and not getattr(args, "manifest", None):
        raise SystemExit("error: --model needs --images DIR (the images to inspect)")
    if not args.groups and model_kind(Path(args.model)) == "export":
        return _predict_exported(args, Path(args.model))
    recursive = args.recursive or args.groups
    predict = _predict_runner(args)  # flags checked before any listing
    parquet_rows = _parquet_rows(args)
    images = _inputs(args, recursive)
    calibration = _images_of(args.calibration, recursive) if args.calibration else None
    spec = _threshold_spec(args, calibration)
    common: dict[str, Any] = {
        "threshold": spec,
        "batch_size": args.batch_size,
        "save_overlays": not args.no_overlays,
        "save_masks": not args.no_masks,
        "resume": not args.no_resume,
        "progress": not args.quiet,
        "config": getattr(args, "resolved_config", None),
        "parquet_rows": parquet_rows,
    }
    model = Path(args.model)
    if args.groups:  # one model per sub-folder of --model, as `anomalens fit --groups` writes
        if not model.is_dir() or (model / "model.json").is_file():
            raise SystemExit(
                f"error: --groups needs --model to be a folder of group models (`anomalens fit "
                f"--groups --out DIR`); {model} is a single model: drop --groups"
            )
        models = {p.name: p for p in sorted(model.iterdir()) if not p.name.startswith(".")}
        models = {k.removesuffix(".anomalens"): v for k, v in models.items()}
        summaries = predict(
            None,
            split_by_group(args.images, images),
            args.out,
            models=models,
            calibration_groups=split_by_group(args.calibration, calibration)
            if calibration
            else None,
            title=f"anomalens {model.name}: {Path(args.images).name}",
            **common,
        )
        _print_summaries(summaries, args.out, Path(args.out) / "index.html")
        return 0
    kind = model_kind(model)
    if kind != "anomalens":
        raise SystemExit(
            f"error: {model} is an exported model ({kind}); run it with the exported model's "
            "inferencer"
        )
    detector, thr = load_model_for_predict(model, device=args.device)
    summary = predict(
        None,
        images,
        args.out,
        detector=detector,
        model_threshold=thr,
        title=f"anomalens {detector.name} ({model.name}): "
        f"{Path(args.images or args.manifest).name}",
        **common,
    )
    _print_summaries({"": summary}, args.out, Path(args.out) / "report.html")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """``anomalens fit``: fit once on the normal images and save the model with its threshold."""
    from anomalens.pipeline import fit_model, fit_model_groups, split_by_group
    from anomalens.registry import create_detector

    kwargs = _method_kwargs(args)
    normals = _images_of(args.normal, args.recursive or args.groups) if args.normal else []
    recursive = args.recursive or args.groups
    calibration = _images_of(args.calibration, recursive) if args.calibration else None
    spec = _threshold_spec(args, calibration)
    if args.object_name and args.class_names:
        raise SystemExit("error: give either --object-name or --class-names, not both")

    views = _image_views(args)

    def make_detector() -> Any:
        from anomalens.geometry import with_views

        return with_views(create_detector(args.method, **kwargs), views)

    if args.groups:
        if not args.normal:
            raise SystemExit("error: --groups needs --normal DIR with one sub-folder per group")
        summaries = fit_model_groups(
            make_detector,
            split_by_group(args.normal, normals),
            args.out,
            calibration_groups=split_by_group(args.calibration, calibration)
            if calibration
            else None,
            threshold=spec,
            class_names=args.class_names,
            category=args.object_name,
            embed_weights=args.embed_weights,
        )
    else:
        summaries = {
            "": fit_model(
                make_detector,
                normals,
                args.out,
                threshold=spec,
                category=args.object_name,
                embed_weights=args.embed_weights,
            )
        }
    for group, s in summaries.items():
        thr = (
            f"threshold {s.threshold.value:.6g} ({s.threshold.method})"
            if s.threshold is not None
            else "threshold set from each scored batch"
        )
        print(
            f"{group + ': ' if group else ''}{args.method} fitted on {s.num_shots} normal "
            f"image(s), {thr}; {len(s.errors)} unreadable; {s.seconds:.1f} s -> {s.path}"
        )
    print(
        f"use it: anomalens predict --model {args.out} --images DIR --out DIR"
        + (" --groups" if args.groups else "")
    )
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anomalens.benchmark.runner import BenchmarkConfig, run_benchmark

    if args.prompt_list and args.shots is not None:
        raise SystemExit(
            "error: --shots and --prompt-list exclude each other: the list gives the prompts "
            "(k = the number it lists per category, 1 for a per-test-image list)"
        )
    cfg = BenchmarkConfig(
        method=args.method,
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        categories=args.categories,
        shots=[0, 1, 2, 4] if args.shots is None else args.shots,
        seeds=args.seeds,
        draw_rule=args.draw_rule,
        method_kwargs=_method_kwargs(args),
        pixel_mode=args.pixel_mode,
        batch_size=args.batch_size,
        max_test_images=args.max_test_images,
        prompt_list=args.prompt_list,
    )
    run_cells = None
    if args.engine == "ray":
        import functools

        from anomalens.distributed import RayOptions, require_ray, run_cells_on_ray

        try:
            require_ray()
            options = RayOptions(
                address=args.ray_address,
                workers=2 if args.workers is None else args.workers,
                gpus_per_worker=args.gpus_per_worker or 0.0,
            )
        except (RuntimeError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from None
        run_cells = functools.partial(run_cells_on_ray, options=options, progress=not args.quiet)
    elif args.ray_address or args.workers is not None or args.gpus_per_worker:
        raise SystemExit("error: --ray-address, --workers, --gpus-per-worker need --engine ray")
    started = _utc_now()
    rows = run_benchmark(cfg, progress=not args.quiet, run_cells=run_cells)
    lists = {
        r["prompt_list"]: {
            "path": r["prompt_list"],
            "sha256": r.get("prompt_list_sha256"),
            "kind": r.get("prompt_list_kind"),
            "seed": r.get("seed"),
        }
        for r in rows
        if r.get("prompt_list")
    }
    extra = {"prompt_lists": sorted(lists.values(), key=lambda x: x["path"])} if lists else None
    _write_run_json(Path(args.out) / "run.json", args, started, extra)
    print((Path(args.out) / "results.md").read_text())
    print(f"written: {args.out}/results.csv, summary.csv, results.json, results.md")
    return 0


def _utc_now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_run_json(
    path: Path, args: argparse.Namespace, started: str, extra: dict[str, Any] | None = None
) -> None:
    """run.json of a command whose library call writes none: version, times, command, config
    (and ``extra``, e.g. the benchmark's prompt-list files with their sha256)."""
    import platform
    import shlex

    from anomalens import __version__
    from anomalens.fileio import atomic_write_json

    argv = ["anomalens", *sys.argv[1:]]
    atomic_write_json(
        path,
        {
            "anomalens_version": __version__,
            "started": started,
            "finished": _utc_now(),
            "command": shlex.join(argv),
            "argv": argv,
            "host": platform.node(),
            "python": platform.python_version(),
            "config": getattr(args, "resolved_config", None),
            **(extra or {}),
        },
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from anomalens.data.synthetic import generate_synthetic_dataset

    root = generate_synthetic_dataset(
        args.out,
        categories=args.categories,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_defect=args.n_test_defect,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"synthetic dataset (MVTec layout) written to {root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from anomalens.demo import run_demo

    run_demo(
        args.out,
        weights=args.weights,
        backbone=args.backbone,
        seed=args.seed,
        progress=not args.quiet,
    )
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from anomalens.backbones.bundle import pack_weights, unpack_weights
    from anomalens.backbones.catalogue import WEIGHTS
    from anomalens.backbones.weights import cache_dir, resolve_weights

    if args.action == "list":
        print(f"cache folder: {cache_dir()}")
        for w in WEIGHTS:
            here = (cache_dir() / w.filename).is_file()
            print(f"  {w.name:<28} {'cached ' if here else 'missing'}  {w.description}")
        return 0
    if args.action == "download":
        path = resolve_weights(args.name, cache=args.to, offline=False)
        print(f"{args.name} -> {path}")
        return 0
    if args.action == "pack":
        out = pack_weights(args.folder, args.out)
        print(f"bundle written: {out}")
        return 0
    # unpack (the sub-parser allows no other action)
    dest = Path(args.to) if args.to else cache_dir()
    files = unpack_weights(args.bundle, dest)
    print(f"{len(files)} files verified and placed in {dest}")
    return 0


def _load_model_folder(path: str) -> Any:
    """Load a saved model folder (``anomalens fit``) for ``export --model``.

    MODEL FILES PLUG IN HERE: ``anomalens.load_detector`` (issue 11 section 1) is written
    separately; until it is available, ``--model`` says so and ``--method/--normal`` fits.
    """
    import anomalens

    load_detector = getattr(anomalens, "load_detector", None)
    if load_detector is None:
        raise SystemExit(
            "error: --model needs model files (anomalens fit / load_detector), not in this "
            "version yet; fit and export in one step with --method M --normal DIR"
        )
    return load_detector(path)


def cmd_export(args: argparse.Namespace) -> int:
    """Fit (or load) a detector and export it as one graph + metadata.json."""
    from anomalens.export import export_detector
    from anomalens.thresholds import (
        calibrate_leave_one_out,
        calibrate_on_normals,
        fixed_threshold,
    )

    graph_precision = args.precision or "fp32"
    args.precision = None  # --precision is the exported graph's; the detector runs in fp32
    thr = fixed_threshold(args.threshold, args.pixel_threshold) if args.threshold else None
    if args.model:
        if args.method or args.normal:
            raise SystemExit("error: give either --model or --method/--normal, not both")
        det = _load_model_folder(args.model)
        thr = thr or getattr(det, "threshold", None)
    else:
        if not args.method:
            raise SystemExit("error: give --model DIR, or --method M (with --normal DIR)")
        from anomalens.data.io import load_image
        from anomalens.registry import create_detector

        kwargs = _method_kwargs(args)
        shots = [load_image(p) for p in _images_of(args.normal, False)] if args.normal else []

        def make() -> Any:
            return create_detector(args.method, **kwargs)

        det = make().fit(shots or None, category=args.object_name)
        if thr is None and args.calibration:
            normals = [load_image(p) for p in _images_of(args.calibration, False)]
            thr = calibrate_on_normals(
                det, normals, percentile=args.percentile or 99.0, margin=args.margin
            )
        elif thr is None and len(shots) >= 2:
            thr = calibrate_leave_one_out(
                make,
                shots,
                percentile=args.percentile or 100.0,
                margin=args.margin,
                category=args.object_name,
            )
    out = export_detector(
        det,
        args.out,
        format=args.format,
        threshold=thr,
        precision=graph_precision,
        quantize=args.quantize,
        calibration_images=args.quantize_calibration,
        overwrite=args.overwrite,
    )
    meta = json.loads((out / "metadata.json").read_text())
    t = meta["threshold"]
    how = "none" if t is None else "{:.6g} ({})".format(t["value"], t["method"])
    size = meta["image_size"]
    print(
        f"{meta['method']} exported as {args.format} to {out} "
        f"(input uint8 (N, {size}, {size}, 3); threshold {how})"
    )
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``anomalens`` parser with every sub-command (imports no torch)."""
    p = _Parser(
        prog="anomalens",
        description="Universal visual anomaly detection from zero or a few normal images.",
        epilog=EPILOG,
        formatter_class=_RawHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser(
        "list",
        help="list methods, backbones and datasets",
        description="List the names that --method, --backbone and --dataset accept.",
    )
    s.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "methods", "backbones", "datasets"],
        help="what to list",
    )
    s.set_defaults(func=cmd_list)

    s = sub.add_parser(
        "predict",
        help="score a folder of images, with masks, overlays, CSV and an HTML report",
        description="Fit a detector on your own k normal images (--normal, omit for zero-shot "
        "methods), score every image of --images and write results.csv, results.jsonl, "
        "overlays/, masks/, report.html and run.json into --out. The decision threshold is "
        "set without labelled defects: leave-one-out on the normal images (default), a "
        "--calibration folder of further normal images, or a fixed --threshold. Reruns "
        "resume: images already scored with the same settings are skipped. With --model, a "
        "model written by `anomalens fit` is used as it is (no refit, its saved threshold).",
    )
    _add_config_flag(s)
    _add_method_flags(s, required=False)
    s.add_argument(
        "--model",
        help="a fitted model (folder or .anomalens file from `anomalens fit`) instead of "
        "--method and --normal; with --groups, the folder of per-group models (default: none, "
        "fit with --method)",
    )
    s.add_argument(
        "--normal",
        help="folder of k normal (good) images (default: none, for zero-shot methods)",
    )
    s.add_argument(
        "--images",
        help="folder of images to inspect (required, except with --pairs; default: none)",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--recursive", action="store_true", help="include sub-folders")
    s.add_argument(
        "--groups",
        action="store_true",
        help="one memory and one threshold per sub-folder: the images of --images/G/ are "
        "scored against the normal images of --normal/G/ only (e.g. one product per "
        "sub-folder; no class names needed); writes OUT/G/ per group plus OUT/results.csv "
        "and OUT/index.html; with --engine ray the groups are fitted and scored in parallel",
    )
    s.add_argument(
        "--object-name",
        help="object name for methods whose text prompts name the object (WinCLIP), e.g. "
        "'bottle'; the other methods ignore it (default: the method's generic word)",
    )
    s.add_argument(
        "--class-names",
        action="store_true",
        help="with --groups: use each sub-folder's name as its object name (see --object-name)",
    )
    r = s.add_argument_group(
        "reference-based inspection (each image against its own normal reference)"
    )
    r.add_argument(
        "--pairs",
        metavar="FILE",
        help="CSV with columns image,reference[,mask] (paths relative to the file); use "
        "--method refdiff for golden-template comparison, see docs/reference.md (default: none)",
    )
    r.add_argument(
        "--reference-dir",
        metavar="DIR",
        help="references for --images: same relative path or file name, else the same stem "
        "(default: none)",
    )
    r.add_argument(
        "--align",
        default="none",
        choices=["none", "ecc", "homography"],
        help="align each image to its reference first (OpenCV)",
    )
    r.add_argument(
        "--calibration-pairs",
        metavar="FILE",
        help="pairs file of known-good pairs to set the threshold on (default: from the "
        "batch, assumed mostly normal)",
    )
    _add_threshold_flags(s)
    s.add_argument("--batch-size", type=int, default=8, help="images scored per batch")
    s.add_argument("--no-overlays", action="store_true", help="do not write heat-map overlays")
    s.add_argument("--no-masks", action="store_true", help="do not write binary masks")
    s.add_argument("--no-resume", action="store_true", help="recompute everything")
    s.add_argument("-q", "--quiet", action="store_true", help="no status line, no progress bars")
    e = s.add_argument_group("scale out (Ray; pip install 'anomalens[ray]', see docs/scale.md)")
    e.add_argument(
        "--manifest",
        metavar="FILE",
        help="images to inspect, one path per line (relative to the file), instead of --images "
        "(default: none)",
    )
    e.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: this process (default); ray: an actor pool on a Ray cluster",
    )
    e.add_argument(
        "--ray-address",
        help="auto (the cluster this machine belongs to) or HOST:PORT of the head "
        "(default: a private Ray instance on this machine for the run)",
    )
    e.add_argument(
        "--workers",
        type=int,
        help="scoring actors (default 2); with --groups also the groups fitted at once",
    )
    e.add_argument(
        "--gpus-per-worker", type=float, help="GPUs per actor; > 0 runs them on cuda (default 0)"
    )
    e.add_argument(
        "--parquet",
        action="store_true",
        help="also write the rows of results.csv as Parquet shards OUT/results.parquet/"
        "part-NNNNN.parquet while the run goes on (typed columns, each shard complete or "
        "absent, resumable; either engine; needs pyarrow: pip install 'anomalens[parquet]')",
    )
    e.add_argument(
        "--parquet-rows",
        type=int,
        metavar="N",
        help="with --parquet: rows per shard (default 100000)",
    )
    e.add_argument(
        "--shard-size",
        type=int,
        metavar="N",
        help="MuSc: images per shard of its mutual scoring; a worker's memory grows with it "
        "(default: the images split into 2 shards per worker; see docs/scale.md)",
    )
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser(
        "fit",
        help="fit once on normal images and save the model with its threshold",
        description="Fit a detector on your k normal images (--normal; omit it for zero-shot "
        "methods), set its decision threshold without labelled defects (leave-one-out on the "
        "normal images by default, a --calibration folder, or --threshold) and save both as "
        "a model folder (or NAME.anomalens file) for `anomalens predict --model`. Backbone "
        "weights are referenced by name and checksum; --embed-weights stores them too.",
    )
    _add_config_flag(s, recorded=False)
    _add_method_flags(s)
    s.add_argument(
        "--normal",
        help="folder of k normal (good) images (default: none, for zero-shot methods)",
    )
    s.add_argument("--out", required=True, help="model folder, or a .anomalens file")
    s.add_argument("--recursive", action="store_true", help="include sub-folders")
    s.add_argument(
        "--groups",
        action="store_true",
        help="one model per sub-folder of --normal: writes OUT/G/ for each group G "
        "(use with `anomalens predict --model OUT --groups`)",
    )
    s.add_argument(
        "--object-name",
        help="object name for methods whose prompts name it (WinCLIP) (default: the method's "
        "generic word)",
    )
    s.add_argument(
        "--class-names",
        action="store_true",
        help="with --groups: use each sub-folder's name as its object name",
    )
    s.add_argument(
        "--embed-weights",
        action="store_true",
        help="store the backbone weights in the model (self-contained, larger)",
    )
    s.add_argument("-q", "--quiet", action="store_true", help="no status line")
    _add_threshold_flags(s)
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser(
        "benchmark",
        help="the field's k-shot protocol over categories, shots and seeds (resumable)",
        description="For each category, k and seed: draw k normal images from train/ "
        "(reproducible from the seed), fit, score test/, compute I-AUROC, I-AP, I-F1max, "
        "P-AUROC, P-AP, P-F1max, P-AUPRO and time per image. Writes results.csv (one row per "
        "run), summary.csv and results.md (mean ± std over seeds) and results.json. Finished "
        "runs are kept in OUT/jobs/ and skipped when the command is run again. With "
        "--prompt-list the normal images are read from list files instead of drawn.",
    )
    _add_config_flag(s)
    _add_method_flags(s)
    s.add_argument(
        "--dataset",
        required=True,
        choices=DATASETS,
        help="dataset layout (see docs/data.md)",
    )
    s.add_argument("--root", required=True, help="dataset root folder")
    s.add_argument("--categories", nargs="+", help="categories (default: all under --root)")
    s.add_argument(
        "--shots",
        nargs="+",
        type=int,
        help="k values, 0 = zero-shot; not with --prompt-list, whose files set k "
        "(default: 0 1 2 4)",
    )
    s.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[10, 20, 30],
        help="seeds of the k-shot draws (or of the --prompt-list files)",
    )
    s.add_argument(
        "--draw-rule",
        default=SHOT_RULES[0],
        choices=SHOT_RULES,
        help="reference draw: k distinct images (without_replacement), the official AdaptCLIP rule "
        "(torch.manual_seed(seed); torch.randint, with replacement), or the first k images "
        "(anomalib's WinCLIP)",
    )
    s.add_argument(
        "--prompt-list",
        metavar="FILE",
        help="read the normal prompts from a list instead of drawing them (the official MetaUAS "
        "protocol): a per-category list such as the official oneprompt_seedN.json (any method "
        "that takes normal images; k = the images listed) or a per-test-image list such as "
        "test-train-top10pair-eb4.json (MetaUAS*: each image with the first prompt listed; "
        "metauas only). Paths inside are relative to --root. '{seed}' in FILE reads one file "
        "per --seeds value ('lists/oneprompt_seed{seed}.json' --seeds 1 3 5 7 9); without it, "
        "each category runs once. Path and sha256 go into the results; see docs/data.md "
        "(default: none: k normal images drawn per seed)",
    )
    s.add_argument(
        "--pixel-mode",
        default="exact",
        choices=["exact", "binned"],
        help="pixel metrics computed exactly or on binned scores (faster; see docs/metrics.md)",
    )
    s.add_argument(
        "--max-test-images",
        type=int,
        help="cap test images per category, for quick runs (default: all)",
    )
    s.add_argument("--batch-size", type=int, default=8, help="images scored per batch")
    s.add_argument("--out", required=True, help="output folder (a rerun resumes in it)")
    s.add_argument("-q", "--quiet", action="store_true", help="no status line, no progress bars")
    e = s.add_argument_group("scale out (Ray; pip install 'anomalens[ray]', see docs/scale.md)")
    e.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: cells one after the other (default); ray: each cell a Ray task",
    )
    e.add_argument("--ray-address", help="auto or HOST:PORT (default: a private Ray instance)")
    e.add_argument("--workers", type=int, help="cells run at the same time (default 2)")
    e.add_argument("--gpus-per-worker", type=float, help="GPUs per cell (default 0)")
    s.set_defaults(func=cmd_benchmark)
    s = sub.add_parser(
        "export",
        help="export a fitted detector as one ONNX / OpenVINO / TorchScript graph",
        description="Fit a detector on --normal (or load a saved --model) and write one graph "
        "(uint8 images (N, S, S, 3) -> image score (N,), anomaly map (N, S, S)) plus "
        "metadata.json (threshold, size, settings) into --out. Run it without PyTorch with "
        "anomalens.inference (pip install 'anomalens[onnx]' or 'anomalens[openvino]'). "
        "--precision is the exported graph's (fp16: GPU targets).",
    )
    s.add_argument(
        "--model", help="saved model (anomalens fit) instead of --method (default: none)"
    )
    _add_method_flags(s, default_method="")
    s.add_argument(
        "--normal", help="folder of k normal (good) images to fit on (default: none, zero-shot)"
    )
    s.add_argument(
        "--object-name",
        help="object name for prompt-based methods (WinCLIP) (default: the method's word)",
    )
    s.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "openvino", "torchscript"],
        help="graph format",
    )
    s.add_argument("--out", required=True, help="output folder (written atomically)")
    s.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (default: refuse)"
    )
    s.add_argument(
        "--quantize",
        choices=["int8"],
        help="onnxruntime int8 quantisation, onnx only (default: none, fp32)",
    )
    s.add_argument(
        "--quantize-calibration",
        help="folder of normal images for static int8 calibration (default: dynamic, weights only)",
    )
    t = s.add_argument_group("threshold stored in metadata.json")
    t.add_argument(
        "--threshold", type=float, help="fixed image-score threshold (default: leave-one-out)"
    )
    t.add_argument(
        "--pixel-threshold",
        type=float,
        help="fixed pixel threshold for masks (default: calibrated with the image threshold)",
    )
    t.add_argument(
        "--calibration",
        help="folder of extra normal images to calibrate on (default: none, leave-one-out)",
    )
    t.add_argument(
        "--percentile",
        type=float,
        help="percentile of normal scores (default: 99 with --calibration, 100 leave-one-out)",
    )
    t.add_argument("--margin", type=float, default=1.0, help="multiplier on the percentile")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "synth",
        help="write a seeded synthetic defect dataset (MVTec layout)",
        description="Generate textures and objects with drawn defects and their exact masks, "
        "in the MVTec AD folder layout, reproducibly from --seed.",
    )
    s.add_argument("--out", required=True, help="output folder (the dataset root)")
    s.add_argument(
        "--categories", nargs="+", help="subset of the synthetic categories (default: all)"
    )
    s.add_argument("--n-train", type=int, default=20, help="normal train images per category")
    s.add_argument("--n-test-good", type=int, default=10, help="normal test images per category")
    s.add_argument(
        "--n-test-defect", type=int, default=10, help="defective test images per category"
    )
    s.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser(
        "demo",
        help="offline demo: synthetic data -> few-shot PatchCore -> report with overlays",
        description="Generate a small synthetic dataset, fit few-shot PatchCore on a few "
        "normal images and write the review page; downloads nothing.",
    )
    s.add_argument("--out", default="demo_out", help="output folder")
    s.add_argument(
        "--weights",
        help="MobileNetV2 weights file (default: $ANOMALENS_DEMO_WEIGHTS, else the cached "
        "torchvision file, else random features, marked as such)",
    )
    s.add_argument(
        "--backbone",
        help="preset the weights were made for (default: $ANOMALENS_DEMO_BACKBONE or "
        "mobilenet_v2; a TF-converted MobileNetV2 needs mobilenet_v2_tf)",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed of the data and the draw")
    s.add_argument("-q", "--quiet", action="store_true", help="no status line, no progress bars")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "weights",
        help="list, download, pack and unpack weights for offline use",
        description="Weights come from a local path, a URL, an hf-hub:ORG/REPO/FILE id or a "
        "catalogue name, cached in ~/.cache/anomalens ($ANOMALENS_CACHE). Download on a "
        "connected machine, pack, carry the bundle, unpack on the offline one.",
    )
    wsub = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    wsub.add_parser("list", help="catalogue and cache status")
    w = wsub.add_parser("download", help="fetch NAME (catalogue name, URL or hf-hub id) into DIR")
    w.add_argument("name", help="catalogue name (`anomalens weights list`), URL or hf-hub id")
    w.add_argument("--to", help="folder to download into (default: the cache folder)")
    w = wsub.add_parser("pack", help="pack a folder of weights into one verified tar")
    w.add_argument("folder", help="folder of weight files")
    w.add_argument("--out", required=True, help="bundle file to write (.tar)")
    w = wsub.add_parser("unpack", help="verify a bundle and place its files in the cache")
    w.add_argument("bundle", help="bundle file from `anomalens weights pack`")
    w.add_argument("--to", help="destination (default: the cache folder)")
    s.set_defaults(func=cmd_weights)

    from anomalens.service.cli import add_serve_parser
    from anomalens.training.cli import add_train_parser

    add_train_parser(sub, _add_method_flags)
    add_serve_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_expand_config(parser, argv))
    if args.command in CONFIG_COMMANDS:
        args.resolved_config = resolved_config(parser, args)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.version:
        from anomalens import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in _LONG_COMMANDS and not getattr(args, "quiet", False):
        print(_status_line(args), file=sys.stderr, flush=True)  # before any slow import
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(
            "interrupted: finished results are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, RuntimeError) as exc:
        if os.environ.get("ANOMALENS_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
