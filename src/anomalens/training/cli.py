"""``anomalens train adaptclip|anomalyclip``: train adapters / prompts on an auxiliary dataset."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_train_parser", "collect_samples", "run_train"]

METHODS = ("adaptclip", "anomalyclip")


def add_train_parser(sub: Any, _add_method_flags: Callable[..., None] | None = None) -> None:
    """Register the ``train`` sub-command on an argparse sub-parser collection."""
    p = sub.add_parser(
        "train",
        help="train AdaptCLIP adapters or AnomalyCLIP prompts on an auxiliary dataset",
        description="Train once on an auxiliary dataset (the papers train on VisA to test on "
        "MVTec AD and vice versa), then use the checkpoint zero-/few-shot on new domains "
        "with `--checkpoint`. Queries are the auxiliary test split (labels and masks are "
        "used); AdaptCLIP draws one normal prompt image per query from the train split. "
        "Checkpoints are written every epoch; a rerun of the same command resumes.",
    )
    p.add_argument("method", choices=METHODS)
    p.add_argument("--dataset", required=True, choices=["mvtec", "visa", "btad", "mpdd", "folder"])
    p.add_argument("--root", required=True, help="auxiliary dataset root")
    p.add_argument("--categories", nargs="+", help="categories to train on (default: all)")
    p.add_argument(
        "--out",
        required=True,
        help="output: a folder, or a .safetensors file (its run folder is FILE.run/)",
    )
    p.add_argument("--backbone", help="CLIP preset (see `anomalens list backbones`)")
    p.add_argument("--image-size", type=int, help="input size S")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, help="seed (default: the official one of the method)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-resume", action="store_true", help="start over (overwrites)")
    p.add_argument("-q", "--quiet", action="store_true")
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
    test = collect_samples(args.dataset, args.root, args.categories, "test")
    common: dict[str, Any] = {
        "out": run_dir,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": args.device,
        "resume": not args.no_resume,
    }
    if args.seed is not None:
        common["seed"] = args.seed
    if args.method == "adaptclip":
        from tqdm.auto import tqdm

        from anomalens.backbones.clip import ClipBackbone
        from anomalens.training.adaptclip import train_adaptclip

        train = collect_samples(args.dataset, args.root, args.categories, "train")
        backbone: Any = args.backbone or "adaptclip-vitl14-336@518"
        if args.image_size:
            backbone = ClipBackbone.from_preset(
                backbone, image_size=args.image_size, device=args.device
            )
        bar = tqdm(desc="train adaptclip", unit="step", disable=args.quiet)

        def on_step(row: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", epoch=row.get("epoch"))

        result = train_adaptclip(list(test) + list(train), backbone, progress=on_step, **common)
        bar.close()
        ckpt = result.checkpoint
        print(
            f"trained {result.epochs} epochs (resumed after epoch {result.resumed_from}); losses per epoch: "
            + ", ".join(f"{x:.4f}" for x in result.epoch_losses)
        )
    else:
        from anomalens.training.anomalyclip import train_anomalyclip

        kwargs = dict(common)
        if args.backbone:
            kwargs["backbone"] = args.backbone
        ckpt = train_anomalyclip(
            test, image_size=args.image_size, progress=not args.quiet, **kwargs
        )
    if final is not None:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ckpt, final)
        ckpt = final
    print(f"checkpoint: {ckpt}  (use it with --checkpoint {ckpt})")
    return 0
