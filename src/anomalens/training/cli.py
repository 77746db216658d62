"""``anomalens train adaptclip|anomalyclip|metauas``: train on an auxiliary dataset."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_train_parser", "collect_samples", "run_train"]

#: what ``anomalens train`` trains, and the auxiliary dataset layouts it reads (kept here, free
#: of torch, for the parser; tests/unit/test_cli_help.py checks them against the registries)
METHODS = ("adaptclip", "anomalyclip", "metauas")
DATASETS = ("btad", "folder", "mpdd", "mvtec", "pairs", "visa")


def add_train_parser(sub: Any, _add_method_flags: Callable[..., None] | None = None) -> None:
    """Register the ``train`` sub-command on an argparse sub-parser collection."""
    p = sub.add_parser(
        "train",
        help="train AdaptCLIP adapters, AnomalyCLIP prompts or MetaUAS on an auxiliary dataset",
        description="Train once on an auxiliary dataset (the papers train on VisA to test on "
        "MVTec AD and vice versa), then use the checkpoint zero-/few-shot on new domains "
        "with `--checkpoint`. Queries are the auxiliary test split (labels and masks are "
        "used); AdaptCLIP draws one normal prompt image per query from the train split. "
        "MetaUAS uses only the normal train images: it trains on synthetic change pairs made "
        "from them (paste, blend, deform). Checkpoints are written every epoch; a rerun of the same command resumes.",
    )
    p.add_argument("method", choices=METHODS, help="what to train")
    p.add_argument(
        "--dataset",
        required=True,
        choices=DATASETS,
        help="auxiliary dataset layout (see docs/data.md)",
    )
    p.add_argument("--root", required=True, help="auxiliary dataset root")
    p.add_argument("--categories", nargs="+", help="categories to train on (default: all)")
    p.add_argument(
        "--out",
        required=True,
        help="output: a folder, or a .safetensors file (its run folder is FILE.run/)",
    )
    p.add_argument(
        "--backbone",
        help="CLIP preset, see `anomalens list backbones` (default: the method's own)",
    )
    p.add_argument("--image-size", type=int, help="input size S (default: the preset's)")
    p.add_argument("--epochs", type=int, help="training epochs (default: 15; MetaUAS 30)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3; MetaUAS 1e-4, AdamW)")
    p.add_argument(
        "--encoder-weights",
        help="MetaUAS: EfficientNet-B4 weights for the frozen encoder (timm or "
        "efficientnet-pytorch state dict; default: random, with a warning)",
    )
    p.add_argument("--seed", type=int, help="seed (default: the official one of the method)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--no-resume", action="store_true", help="start over (overwrites)")
    p.add_argument("-q", "--quiet", action="store_true", help="no status line, no progress bars")
    p.set_defaults(func=run_train)


def collect_samples(dataset: str, root: str, categories: list[str] | None, split: str) -> list:
    """All samples of ``split`` over the chosen categories (all categories when None)."""
    from anomalens.data.registry import get_index, list_categories

    available = list_categories(dataset, root)
    cats = categories or available
    unknown = [c for c in cats if c not in available]
    if unknown:
        raise ValueError(
            f"unknown categories {', '.join(unknown)} under {root}. Available: {', '.join(available)}"
        )
    out = []
    for c in cats:
        out.extend(get_index(dataset, root, c, split))
    return out


def _run_dir(out: str) -> tuple[Path, Path | None]:
    p = Path(out)
    if p.suffix == ".safetensors":
        return p.with_name(p.name + ".run"), p
    return p, None


def run_train(args: argparse.Namespace) -> int:
    run_dir, final = _run_dir(args.out)
    if args.method == "metauas":
        return _run_train_metauas(args, run_dir, final)
    test = collect_samples(args.dataset, args.root, args.categories, "test")
    common: dict[str, Any] = {
        "epochs": 15 if args.epochs is None else args.epochs,
        "batch_size": args.batch_size,
        "lr": 1e-3 if args.lr is None else args.lr,
        "device": args.device,
        "image_size": args.image_size,
        "resume": not args.no_resume,
    }
    if args.seed is not None:
        common["seed"] = args.seed
    if args.method == "adaptclip":
        from anomalens.training.adaptclip import (
            DEFAULT_BACKBONE,
            AdaptCLIPTrainConfig,
            train_adaptclip,
        )

        train = collect_samples(args.dataset, args.root, args.categories, "train")
        result = train_adaptclip(
            list(test) + list(train),
            args.backbone or DEFAULT_BACKBONE,
            run_dir,
            AdaptCLIPTrainConfig(**common),
            progress=not args.quiet,
        )
    else:
        from anomalens.detectors.anomalyclip import DEFAULT_BACKBONE as ANOMALYCLIP_BACKBONE
        from anomalens.training.anomalyclip import AnomalyCLIPTrainConfig, train_anomalyclip

        result = train_anomalyclip(
            test,
            args.backbone or ANOMALYCLIP_BACKBONE,
            run_dir,
            AnomalyCLIPTrainConfig(**common),
            progress=not args.quiet,
        )
    print(
        f"trained {result.epochs} epochs (resumed after epoch {result.resumed_from}); "
        "losses per epoch: " + ", ".join(f"{x:.4f}" for x in result.epoch_losses)
    )
    _finish(result.checkpoint, final)
    return 0


def _finish(ckpt: Path, final: Path | None) -> None:
    if final is not None:
        from anomalens.fileio import atomic_write_bytes

        atomic_write_bytes(final, ckpt.read_bytes())
        ckpt = final
    print(f"checkpoint: {ckpt}  (use it with --checkpoint {ckpt})")


def _run_train_metauas(args: argparse.Namespace, run_dir: Path, final: Path | None) -> int:
    from tqdm.auto import tqdm

    from anomalens.training.metauas import train_metauas

    normals = [
        s
        for s in collect_samples(args.dataset, args.root, args.categories, "train")
        if s.label == 0
    ]
    bar = tqdm(desc="train metauas", unit="step", disable=args.quiet)

    def on_step(row: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", epoch=row["epoch"])

    result = train_metauas(
        [s.image_path for s in normals],
        run_dir,
        image_size=args.image_size or 256,
        epochs=30 if args.epochs is None else args.epochs,
        batch_size=args.batch_size,
        lr=1e-4 if args.lr is None else args.lr,
        seed=0 if args.seed is None else args.seed,
        device=args.device,
        resume=not args.no_resume,
        encoder_weights=args.encoder_weights,
        groups=[s.category for s in normals],
        progress=on_step,
    )
    bar.close()
    print(
        f"trained {result.epochs} epochs (resumed after epoch {result.resumed_from}); losses per "
        "epoch: " + ", ".join(f"{x:.4f}" for x in result.epoch_losses)
    )
    _finish(result.checkpoint, final)
    return 0
