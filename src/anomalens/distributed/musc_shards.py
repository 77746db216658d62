"""MuSc on a batch cut into shards: every stage a plain function of one shard (no Ray here).

MuSc compares every image of a batch with every other one. To spread a batch over many
workers it is cut into shards of consecutive images and scored by block decomposition:

1. :func:`extract_shard`: read the shard's images, run the backbone, store the tokens of every
   tapped layer and the global embeddings in ``WORK/features/NNNNN.safetensors``.
2. :func:`score_shard`: the shard's images are the queries. For every (r, layer) their LNAMD
   features meet those of every shard in turn, its own included, block by block (query chunk
   x reference chunk, ``chunk_size`` images each). The per-image NN distances go into
   :class:`~anomalens.scoring.musc.MutualScoreBlocks`, which keeps per patch only the
   smallest distances that MSM's interval average needs and checks that every image was
   counted once, so the scores equal a single-process run whatever the blocking. Then
   fusion, upsampling and the image score before RsCIN (the same ``MuSc`` methods as
   ``score_features``) and the map pixels that the batch-robust threshold samples, stored
   in ``WORK/scores/NNNNN.safetensors``.
3. :func:`score_shards` (the driver) runs stages 1 and 2 through a ``run(stage, jobs)``
   callable, forms the ``divide_num`` subsets on the whole batch exactly as ``MuSc.predict``
   does (each image is then compared with the images of its own subset only, wherever they
   lie), and applies RsCIN to all image scores and embeddings (small: N values, N x D).
4. :func:`write_shard`: the shard's maps from its patch scores, judged and written as a
   single-process run writes them.

Why files in the output folder and not Ray's object store: the tokens of a batch are large
(N x sum(L C) values: about 22 GB per 1,000 images for ViT-L-14-336 at 518 px in float32),
beyond a usual object store, and every scoring task reads all of them, one shard at a time;
objects owned by the driver would also be lost with it, while files in the output folder
(which every worker can already reach) survive a killed driver, so the same command reuses
every finished shard. Each file records what it was made from (settings and shard; for
scores, also the whole batch) and is reused only when that matches. The folder is removed
when the run completes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.fileio import atomic_write_bytes, atomic_write_json
from anomalens.pipeline import (
    _groups_of,
    _judge_and_write,
    _save_map,
    display_path,
    load_images_reporting,
    scored_batch,
    threshold_from_dict,
)
from anomalens.scoring.musc import MutualScoreBlocks, check_unit_norm, nn_distances, rscin
from anomalens.thresholds import pixel_sample_positions

if TYPE_CHECKING:
    from anomalens.detectors.musc import MuSc

__all__ = [
    "WORK_DIR",
    "ExtractJob",
    "Runner",
    "ScoreJob",
    "ShardedScores",
    "WriteJob",
    "default_shard_size",
    "extract_shard",
    "local_runner",
    "remove_work",
    "run_stage",
    "score_shard",
    "score_shards",
    "write_jobs",
    "write_shard",
]

log = logging.getLogger(__name__)

#: Scratch folder of a sharded MuSc run, inside the output folder.
WORK_DIR = "musc-work"
_FEATURES = "features"
_SCORES = "scores"
_MAP_SLICE = 16  # images upsampled at once (as MuSc.upsample_patch_scores)


@dataclass(frozen=True)
class ExtractJob:
    """Stage 1 for one shard: its input paths (unreadable ones are reported, not scored)."""

    work: str
    shard: int
    paths: list[str]
    key: str


@dataclass(frozen=True)
class ScoreJob:
    """Stage 2 for one shard.

    Attributes:
        counts: images scored in every shard (after stage 1), in shard order.
        subset: (N,) ``divide_num`` subset of every image of the batch, in batch order.
        pixels: positions into this shard's maps (flattened image after image) whose values
            the batch-robust threshold samples.
        key: settings, batch and shard layout the scores are made for.
    """

    work: str
    shard: int
    counts: list[int]
    subset: np.ndarray
    pixels: np.ndarray
    key: str


@dataclass(frozen=True)
class WriteJob:
    """Stage 4 for one shard: ``items`` = (position in the shard's scores, path, output name,
    final score) of every image still to write."""

    work: str
    shard: int
    items: list[tuple[int, str, str, float]]
    threshold: dict[str, Any]
    out: str
    save_overlays: bool
    save_masks: bool
    seconds: float


#: ``run(stage, jobs, on_result)``: runs the stage's function on every job (anywhere) and
#: returns the results in job order; ``on_result(index, result)`` is called as each arrives.
Runner = Callable[[str, list[Any], Callable[[int, Any], None] | None], list[Any]]


@dataclass
class ShardedScores:
    """What the driver holds after stages 1-3 (everything per image is small).

    Attributes:
        shards: per shard, positions into the input list.
        loaded: per shard, positions into the shard of the images scored (readable ones).
        errors: unreadable inputs (path, error).
        scores: (N,) float32 final image scores (after RsCIN), in batch order.
        raw: (N,) float64 image scores before RsCIN.
        pixels: map values at ``pixel_sample_positions(N * S * S)`` (batch-robust threshold).
        batch: the :func:`~anomalens.pipeline.scored_batch` record of the scored images.
    """

    shards: list[list[int]]
    loaded: list[list[int]]
    errors: list[dict[str, str]]
    scores: np.ndarray
    raw: np.ndarray
    pixels: np.ndarray
    batch: dict[str, Any]


# ------------------------------------------------------------------------------- files
def _file(work: str | Path, kind: str, shard: int) -> Path:
    return Path(work) / kind / f"{shard:05d}.safetensors"


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    blob = save(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={"anomalens": json.dumps(meta)},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)


def _meta(path: Path) -> dict[str, Any] | None:
    """The record stored with a shard file; None when missing or unreadable (recomputed)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("anomalens", "null"))
    except (OSError, ValueError, SafetensorError):
        return None
    return meta if isinstance(meta, dict) else None


def _tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def remove_work(work: str | Path) -> None:
    """Delete a sharded run's scratch folder (done once the run is complete)."""
    shutil.rmtree(work, ignore_errors=True)


def default_shard_size(num_images: int, workers: int, batch_size: int) -> int:
    """Images per shard when none is given: two shards per worker (so that a slow shard does
    not leave the others idle), rounded up to whole backbone batches."""
    size = max(1, -(-num_images // (2 * max(1, workers))))
    return -(-size // batch_size) * batch_size


# ------------------------------------------------------------------------------ stages
def _positions(paths: Sequence[Path], loaded: Sequence[Path]) -> list[int]:
    """Positions in ``paths`` of ``loaded`` (an ordered sub-sequence of it)."""
    out, k = [], 0
    for i, p in enumerate(paths):
        if k < len(loaded) and loaded[k] == p:
            out.append(i)
            k += 1
    return out


def extract_shard(detector: MuSc, job: ExtractJob) -> dict[str, Any]:
    """Stage 1: read the shard's images, run the backbone, store tokens and embeddings.

    Returns:
        The shard's record: ``loaded`` (positions of the readable images), ``errors``,
        ``grids`` (per layer).
    """
    path = _file(job.work, _FEATURES, job.shard)
    meta = _meta(path)
    if meta is not None and meta.get("key") == job.key:
        return {**meta, "reused": True}
    errors: list[dict[str, str]] = []
    paths = [Path(p) for p in job.paths]
    loaded = load_images_reporting(paths, errors)
    tensors: dict[str, torch.Tensor] = {}
    grids: list[list[int]] = []
    if loaded:
        with torch.inference_mode():
            feats = detector.extract_features([im for _, im in loaded])
        tensors = {f"tokens.{i}": t for i, t in enumerate(feats.tokens)}
        tensors["embedding"] = feats.embedding.float()
        grids = [[int(h), int(w)] for h, w in feats.grids]
    meta = {
        "key": job.key,
        "loaded": _positions(paths, [p for p, _ in loaded]),
        "errors": errors,
        "grids": grids,
    }
    _save(path, tensors, meta)
    return {**meta, "reused": False}


def _layer_scores(
    detector: MuSc,
    job: ScoreJob,
    own: torch.Tensor,
    layer: int,
    grid: tuple[int, int],
    r: int,
) -> torch.Tensor:
    """MSM scores (n, L) float32 of the shard's images for one (layer, r), every shard read."""
    offsets = np.concatenate([[0], np.cumsum(job.counts)]).astype(np.int64)
    subset = np.asarray(job.subset, dtype=np.int64)
    sizes = np.bincount(subset)
    within = np.empty_like(subset)  # position of each image inside its subset
    for t, size in enumerate(sizes):
        within[subset == t] = np.arange(size)
    first = int(offsets[job.shard])
    zq = detector.lnamd_features(own.to(detector.device), grid, r)
    if detector.msm_dtype != torch.float32:
        check_unit_norm(zq)
    n = int(zq.shape[0])
    q_sub = subset[first : first + n]
    chunk = detector.chunk_size
    blocks: list[tuple[int, torch.Tensor, MutualScoreBlocks]] = []
    for t in np.unique(q_sub):
        pos = np.flatnonzero(q_sub == t)
        step = len(pos) if chunk is None else chunk
        for a in range(0, len(pos), step):
            part = pos[a : a + step]
            blocks.append(
                (
                    int(t),
                    torch.from_numpy(part),
                    MutualScoreBlocks(
                        within[first + part].tolist(), int(sizes[t]), *detector.topmin
                    ),
                )
            )
    for j, count in enumerate(job.counts):
        r_sub = subset[offsets[j] : offsets[j] + count]
        needed = [int(t) for t in np.unique(q_sub) if bool((r_sub == t).any())]
        if not needed:  # an empty shard, or none of the shard's subsets
            continue
        ref = own if j == job.shard else _tensor(_file(job.work, _FEATURES, j), f"tokens.{layer}")
        for t in needed:
            rpos = np.flatnonzero(r_sub == t)
            if j == job.shard:
                zr = zq[torch.from_numpy(rpos)]
            else:
                zr = detector.lnamd_features(
                    ref[torch.from_numpy(rpos)].to(detector.device), grid, r
                )
            ids = within[offsets[j] + rpos]
            step = len(rpos) if chunk is None else chunk
            for tq, members, acc in blocks:
                if tq != t:
                    continue
                queries = zq[members]
                for b in range(0, len(rpos), step):
                    d = nn_distances(queries, zr[b : b + step], detector.msm_dtype)
                    acc.add(d, ids[b : b + step].tolist())
    out = torch.empty(n, zq.shape[1], dtype=torch.float32, device=zq.device)
    for _, members, acc in blocks:
        out[members] = acc.scores()
    return out


def _raw_and_pixels(
    detector: MuSc, patch: torch.Tensor, positions: np.ndarray
) -> tuple[torch.Tensor, np.ndarray]:
    """Image scores before RsCIN (n,) float64 and the map values at ``positions``."""
    n = int(patch.shape[0])
    per = detector.image_size**2
    raw = torch.empty(n, dtype=torch.float64)
    values = np.empty(len(positions), dtype=np.float32)
    order = np.argsort(positions, kind="stable")
    ranked = np.asarray(positions)[order]
    for i in range(0, n, _MAP_SLICE):
        maps, part = detector.upsample_patch_scores(patch[i : i + _MAP_SLICE])
        raw[i : i + _MAP_SLICE] = part
        lo, hi = np.searchsorted(ranked, [i * per, min(i + _MAP_SLICE, n) * per])
        flat = maps.numpy().reshape(-1)
        values[order[lo:hi]] = flat[ranked[lo:hi] - i * per]
    return raw, values


def score_shard(detector: MuSc, job: ScoreJob) -> dict[str, Any]:
    """Stage 2: MuSc scores of the shard's images against the whole batch (see the module)."""
    path = _file(job.work, _SCORES, job.shard)
    meta = _meta(path)
    if meta is not None and meta.get("key") == job.key:
        return {"shard": job.shard, "reused": True}
    n = job.counts[job.shard]
    tensors: dict[str, torch.Tensor] = {}
    if n:
        own_file = _file(job.work, _FEATURES, job.shard)
        info = _meta(own_file)
        assert info is not None, f"features of shard {job.shard} are missing"
        grids = [(int(h), int(w)) for h, w in info["grids"]]
        per_r: list[list[torch.Tensor]] = [[] for _ in detector.r]
        with torch.inference_mode():
            for i, grid in enumerate(grids):  # one layer's tokens in memory at a time
                own = _tensor(own_file, f"tokens.{i}")
                for k, r in enumerate(detector.r):
                    per_r[k].append(_layer_scores(detector, job, own, i, grid, r))
                del own
            patch = detector.fuse_patch_scores(per_r, grids)
            raw, values = _raw_and_pixels(detector, patch, np.asarray(job.pixels))
        tensors = {"patch": patch.cpu(), "raw": raw, "pixels": torch.from_numpy(values)}
    _save(path, tensors, {"key": job.key})
    return {"shard": job.shard, "reused": False}


def write_shard(detector: MuSc, job: WriteJob) -> list[str]:
    """Stage 4: maps of the shard's images, judged and written (overlays, masks, maps).

    Returns:
        One JSON record per image: ``{"row": ...}`` (a results row) or ``{"error": ...}``.
    """
    thr = threshold_from_dict(job.threshold)
    assert thr is not None
    out = Path(job.out)
    patch = _tensor(_file(job.work, _SCORES, job.shard), "patch")
    errors: list[dict[str, str]] = []
    paths = [Path(p) for _, p, _, _ in job.items]
    loaded = load_images_reporting(paths, errors)
    records = [json.dumps({"error": e}) for e in errors]
    keep_maps = job.save_overlays or job.save_masks
    for k, (p, image) in zip(_positions(paths, [p for p, _ in loaded]), loaded):
        pos, _, name, score = job.items[k]
        with torch.inference_mode():
            maps, _ = detector.upsample_patch_scores(patch[pos : pos + 1])
        amap = maps[0].numpy()
        row = _judge_and_write(
            out,
            p,
            name,
            image,
            float(score),
            amap,
            thr,
            save_overlays=job.save_overlays,
            save_masks=job.save_masks,
        )
        row["map"] = ""
        if keep_maps:
            row["map"] = f"maps/{name}.npy"
            _save_map(out / row["map"], amap)
        row["seconds"] = job.seconds
        records.append(json.dumps({"row": row}))
    return records


#: The stages by name, for runners: ``STAGES[stage](detector, job)``.
STAGES: dict[str, Callable[[MuSc, Any], Any]] = {
    "extract": extract_shard,
    "score": score_shard,
    "write": write_shard,
}


def run_stage(detector: MuSc, stage: str, job: Any) -> Any:
    """Run one job of ``stage`` ("extract", "score" or "write") with ``detector``."""
    return STAGES[stage](detector, job)


# ------------------------------------------------------------------------------- driver
def _prepare(work: Path, key: str) -> None:
    """Empty the scratch folder when it holds another run's files; record this run's key."""
    plan = work / "plan.json"
    try:
        same = json.loads(plan.read_text()).get("key") == key
    except (OSError, ValueError):
        same = False
    if not same:
        remove_work(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan, {"key": key})


def score_shards(
    detector: MuSc,
    image_paths: Sequence[Path],
    work: str | Path,
    shard_size: int,
    run: Runner,
) -> ShardedScores:
    """Stages 1-3: MuSc scores of all readable ``image_paths`` as one batch, in shards.

    Equal to ``detector.predict`` on the readable images with their parent folders as groups
    (as ``anomalens predict`` calls it) up to float rounding of differently batched kernels.

    Args:
        detector: the MuSc detector (its settings; the workers hold their own copy).
        image_paths: the inputs, in order.
        work: scratch folder every worker can reach (see the module docstring).
        shard_size: images per shard (consecutive inputs).
        run: runs a stage's jobs (see :data:`Runner`).

    Raises:
        ValueError: fewer readable images than MuSc needs, or a ``divide_num`` subset of one.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    work = Path(work)
    paths = [Path(p) for p in image_paths]
    shards = [
        list(range(a, min(a + shard_size, len(paths)))) for a in range(0, len(paths), shard_size)
    ]
    key = _digest(
        {
            "detector": detector.config(),
            "shards": [[display_path(paths[k]) for k in s] for s in shards],
        }
    )
    _prepare(work, key)
    infos = run(
        "extract",
        [
            ExtractJob(str(work), i, [os.fspath(paths[k]) for k in s], key)
            for i, s in enumerate(shards)
        ],
        None,
    )
    loaded = [[int(k) for k in info["loaded"]] for info in infos]
    errors = [dict(e) for info in infos for e in info["errors"]]
    batch_paths = [paths[s[k]] for s, pos in zip(shards, loaded) for k in pos]
    n = len(batch_paths)
    if n < max(detector.min_batch, 1):
        raise ValueError(
            f"{detector.name} needs a batch of at least {detector.min_batch} readable images, "
            f"got {n}"
        )
    subset = np.empty(n, dtype=np.int64)
    for t, members in enumerate(detector.plan_subsets(_groups_of(batch_paths), stacklevel=3)):
        subset[members] = t
    batch = scored_batch(batch_paths)
    counts = [len(p) for p in loaded]
    batch_key = _digest({"settings": key, "batch": batch, "counts": counts})
    per = detector.image_size**2
    positions = pixel_sample_positions(n * per)
    order = np.argsort(positions, kind="stable")
    bounds = np.searchsorted(positions[order], np.cumsum([0, *counts]) * per)
    picks = [order[bounds[i] : bounds[i + 1]] for i in range(len(shards))]
    first = np.cumsum([0, *counts])
    done = run(
        "score",
        [
            ScoreJob(str(work), i, counts, subset, positions[picks[i]] - first[i] * per, batch_key)
            for i in range(len(shards))
        ],
        None,
    )
    reused = sum(bool(x.get("reused")) for x in infos), sum(bool(x.get("reused")) for x in done)
    if any(reused):
        log.info(
            "MuSc: reused the features of %d and the scores of %d of %d shards (%s)",
            *reused,
            len(shards),
            work,
        )
    raw = np.empty(n, dtype=np.float64)
    pixels = np.empty(len(positions), dtype=np.float32)
    emb: list[torch.Tensor] = []
    for i, c in enumerate(counts):
        if not c:
            continue
        scores_file = _file(work, _SCORES, i)
        raw[first[i] : first[i + 1]] = _tensor(scores_file, "raw").numpy()
        pixels[picks[i]] = _tensor(scores_file, "pixels").numpy()
        emb.append(F.normalize(_tensor(_file(work, _FEATURES, i), "embedding").float(), dim=-1))
    final = rscin(torch.from_numpy(raw), torch.cat(emb), detector.k_list).float().numpy()
    return ShardedScores(shards, loaded, errors, final, raw, pixels, batch)


def write_jobs(
    scored: ShardedScores,
    image_paths: Sequence[Path],
    names: Sequence[str],
    skip: set[str] | dict[str, Any],
    work: str | Path,
    threshold: dict[str, Any],
    out: str | Path,
    *,
    save_overlays: bool,
    save_masks: bool,
    seconds: float,
) -> list[WriteJob]:
    """Stage-4 jobs for the scored images whose display path is not in ``skip``."""
    jobs = []
    at = 0  # batch position of the shard's first scored image
    for i, (shard, pos) in enumerate(zip(scored.shards, scored.loaded)):
        items = []
        for k, p in enumerate(pos):
            path = Path(image_paths[shard[p]])
            if display_path(path) not in skip:
                items.append((k, os.fspath(path), names[shard[p]], float(scored.scores[at + k])))
        at += len(pos)
        if items:
            jobs.append(
                WriteJob(
                    str(work),
                    i,
                    items,
                    threshold,
                    str(Path(out).resolve()),
                    save_overlays,
                    save_masks,
                    seconds,
                )
            )
    return jobs


def local_runner(detector: MuSc) -> Runner:
    """A :data:`Runner` that runs every job here, one after the other (tests, one machine)."""

    def run(stage: str, jobs: list[Any], on_result: Callable[[int, Any], None] | None) -> list[Any]:
        results = []
        for i, job in enumerate(jobs):
            results.append(run_stage(detector, stage, job))
            if on_result is not None:
                on_result(i, results[-1])
        return results

    return run
