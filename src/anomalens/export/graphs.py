"""One ``nn.Module`` per method that computes a fitted detector's outputs from uint8 images.

Every graph takes (N, S, S, 3) uint8 RGB images at the detector's working size S and returns
``(image_score (N,), anomaly_map (N, S, S))`` float32. Normalisation, backbone, scoring against
the fitted state (memory banks, Gaussian statistics, text anchors, adapters: buffers of the
module, i.e. constants of an exported graph) and map smoothing all run inside. The graphs call
the detectors' own feature and scoring functions; only the resize to S stays outside (PIL, as
``anomalens.data.transforms.to_batch`` does), so that the exported input is exactly the uint8
array that the PyTorch path normalises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from anomalens.detectors.base import Detector
from anomalens.detectors.mvg import sum_level_maps

__all__ = ["EXPORTABLE_METHODS", "ExportError", "build_graph", "preprocessing_of"]


class ExportError(ValueError):
    """A detector cannot be exported (method, state or settings); the message says why."""


class _Normalize(nn.Module):
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 ``(x / 255 - mean) / std``, the same float32
    operations as ``to_batch``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std


class _Graph(nn.Module):
    """Base of the per-method graphs: normalisation, then :meth:`score`."""

    def __init__(self, detector: Detector, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = _Normalize(mean, std)
        self.image_size = int(detector.image_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, S, S, 3) uint8 -> image_score (N,), anomaly_map (N, S, S), float32."""
        score, amap = self.score(self.normalize(images))
        return score.float(), amap.float()

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PatchCoreGraph(_Graph):
    """PatchCore: CNN patch features -> exact k-NN distance to the memory bank (a constant)."""

    bank: torch.Tensor
    bank_sq: torch.Tensor

    def __init__(self, detector: Any) -> None:
        p = detector.extractor.preset
        super().__init__(detector, p.mean, p.std)
        if detector.image_score_mode != "max":
            raise ExportError(
                "patchcore with image_score='reweighted' cannot be exported yet (its score "
                "indexes the memory bank per image); refit with image_score='max'"
            )
        self.extractor = detector.extractor
        self.reduction = detector.reduction
        self.patch_size = detector.patch_size
        self.k = min(detector.k, int(detector.memory_bank.shape[0]))
        self.upsample_mode = detector.upsample_mode
        self.sigma = detector.sigma
        bank = detector.memory_bank.detach().float().cpu().contiguous()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", (bank * bank).sum(1))

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from anomalens.detectors.patchcore import embed_patches
        from anomalens.scoring.maps import gaussian_smooth, upsample

        feats = embed_patches(self.extractor(x), self.reduction, self.patch_size)
        b, d, h, w = feats.shape
        q = feats.permute(0, 2, 3, 1).reshape(-1, d)
        # scoring.knn.knn without its chunk loop: rank by the expansion, exact distances
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ self.bank.T) + self.bank_sq[None, :]
        ind = torch.topk(d2, self.k, dim=1, largest=False, sorted=True).indices
        dist = torch.linalg.vector_norm(q[:, None, :] - self.bank[ind], dim=-1)  # (b*h*w, k)
        patch = dist.mean(1).reshape(b, h, w)
        maps = gaussian_smooth(
            upsample(patch, self.image_size, mode=self.upsample_mode), self.sigma
        )
        return patch.flatten(1).amax(1), maps


class MVGGraph(_Graph):
    """Gaussian (MVG): Mahalanobis distance per level with the fitted means and whitenings."""

    def __init__(self, detector: Any) -> None:
        p = detector.extractor.preset
        super().__init__(detector, p.mean, p.std)
        self.extractor = detector.extractor
        self.patch_size = detector.patch_size
        self.image_score_mode = detector.image_score_mode
        self.upsample_mode = detector.upsample_mode
        self.sigma = detector.sigma
        self.levels = len(detector.means)
        for i, (mean, whitening) in enumerate(zip(detector.means, detector.whitenings)):
            # float64 as fitted: the distances match the PyTorch path to the last float32 bit
            self.register_buffer(f"mean{i}", mean.detach().double().cpu())
            self.register_buffer(
                f"whitening_t{i}", whitening.detach().double().cpu().T.contiguous()
            )

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        from anomalens.detectors.mvg import reduce_patch_scores
        from anomalens.scoring.maps import gaussian_smooth, upsample

        feats = self.extractor(x)
        if self.patch_size > 1:
            p = self.patch_size
            feats = [F.avg_pool2d(f, p, stride=1, padding=p // 2) for f in feats]
        dmaps = []
        for i, fmap in enumerate(feats):
            b, c, h, w = fmap.shape
            mean, w_t = getattr(self, f"mean{i}"), getattr(self, f"whitening_t{i}")
            # anomalens.detectors.mvg.mahalanobis with W^T stored
            z = (fmap.permute(0, 2, 3, 1).reshape(-1, c).double() - mean) @ w_t
            dmaps.append(torch.linalg.vector_norm(z, dim=1).float().reshape(b, h, w))
        total = sum_level_maps(dmaps)
        maps = gaussian_smooth(upsample(total, self.image_size, self.upsample_mode), self.sigma)
        return reduce_patch_scores(total, self.image_score_mode), maps


@contextlib.contextmanager
def _one_chunk(detector: Any) -> Iterator[None]:
    """Run a CLIP detector's feature code on the whole batch at once (no Python chunk loop
    in the traced graph)."""
    old = detector.batch_size
    detector.batch_size = 1 << 30
    try:
        yield
    finally:
        detector.batch_size = old


class WinCLIPGraph(_Graph):
    """WinCLIP / WinCLIP+: window and image embeddings against the text prototypes (constants)
    and, when fitted with normal images, the reference memories (constants)."""

    def __init__(self, detector: Any) -> None:
        bb = detector.backbone
        super().__init__(detector, bb.mean, bb.std)
        self.detector = detector
        self.backbone = bb.model  # registered so that its weights move with the graph
        _ = detector.text_prototypes  # cached before tracing

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _one_chunk(self.detector):
            pred = self.detector.score_features(self.detector.extract(x))
        return pred.image_score, pred.anomaly_map


class FrozenClipGraph(_Graph):
    """AdaptCLIP / AnomalyCLIP: tapped CLIP tokens -> the method's ``score_features``
    (adapters, text embeddings and prompt memory are constants of the graph)."""

    def __init__(self, detector: Any) -> None:
        bb = detector.backbone
        super().__init__(detector, bb.mean, bb.std)
        self.detector = detector
        self.backbone = bb.model
        for name in ("adapters", "prompt_learner"):
            if isinstance(getattr(detector, name, None), nn.Module):
                self.add_module(name, getattr(detector, name))

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.detector.score_features(self.detector.encode(x))
        return out["image_score"], out["anomaly_map"]


_GRAPHS: dict[str, Callable[[Any], _Graph]] = {
    "patchcore": PatchCoreGraph,
    "mvg": MVGGraph,
    "winclip": WinCLIPGraph,
    "adaptclip": FrozenClipGraph,
    "anomalyclip": FrozenClipGraph,
}
#: Methods that export to one graph.
EXPORTABLE_METHODS: tuple[str, ...] = tuple(sorted(_GRAPHS))


def preprocessing_of(detector: Detector) -> dict[str, Any]:
    """How images become the graph's input: squash-resize to S with a PIL filter.

    Returns:
        ``{"size": S, "resize": "squash", "interpolation": name, "mean": [...], "std": [...]}``
        (mean/std are applied inside the graph; recorded for the reader).
    """
    if hasattr(detector, "extractor"):
        p = detector.extractor.preset
        interp, mean, std = p.interpolation, p.mean, p.std
    else:
        bb = detector.backbone  # type: ignore[attr-defined]
        interp, mean, std = bb.interpolation, bb.mean, bb.std
    return {
        "size": int(detector.image_size),
        "resize": "squash",
        "interpolation": str(interp),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def build_graph(detector: Detector) -> nn.Module:
    """The export graph of a fitted detector, in eval mode on the CPU in float32.

    Raises:
        ExportError: a method that cannot be one graph (MuSc: its scores depend on the whole
            batch), an unfitted few-shot detector, or a detector not running in float32.
    """
    name = detector.name
    if detector.scores_whole_batch:
        raise ExportError(
            f"{name} cannot be exported as one graph: it scores the images of a batch against "
            "each other (its results depend on the whole batch). Run it with `anomalens predict "
            f"--method {name}`. Exportable methods: {', '.join(EXPORTABLE_METHODS)}"
        )
    if name not in _GRAPHS:
        raise ExportError(
            f"no export graph for method {name!r}. Exportable methods: "
            f"{', '.join(EXPORTABLE_METHODS)}"
        )
    if not detector.is_fitted:
        if detector.needs_normal_images():
            raise ExportError(f"{name} is not fitted: call fit(normal_images) before exporting it")
        detector.fit(None)
    if detector.device.type != "cpu":
        raise ExportError(
            f"export a detector built on the CPU (device='cpu'); this one is on {detector.device}"
        )
    precision = getattr(detector, "precision", "fp32")
    if precision != "fp32":
        raise ExportError(
            f"export needs the detector's backbone in fp32 (precision='fp32'), got {precision!r}; "
            "use export_detector(..., precision='fp16') for a half-precision graph"
        )
    with torch.inference_mode(False):
        graph = _GRAPHS[name](detector)
    return graph.eval()
