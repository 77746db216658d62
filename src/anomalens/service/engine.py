"""Inspection: fitted detectors cached in memory, scoring, overlay/heat-map/mask files, records.

Files under ``<data_dir>``::

    images/<sha[:2]>/<sha>.png                      the inspected image (re-encoded PNG)
    artifacts/<profile uid>/<sha>_{overlay,heatmap,mask}.png

Names come from content hashes and profile ids only, never from client file names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.detectors.base import Detector
from anomalens.fileio import atomic_save_png
from anomalens.results import judge_image, write_result_images
from anomalens.service.errors import ServiceError
from anomalens.service.profiles import Profile, ProfileStore
from anomalens.service.store import ResultStore
from anomalens.service.uploads import DecodedImage
from anomalens.thresholds import Threshold

__all__ = ["DetectorCache", "InspectionEngine"]

log = logging.getLogger(__name__)
ProgressFn = Callable[[list[dict[str, Any]]], None]


@dataclass
class _Entry:
    uid: str
    detector: Detector
    lock: threading.Lock


class DetectorCache:
    """Fitted detectors by profile name, least recently used dropped beyond ``maxsize``.

    A detector is used by one thread at a time (``_Entry.lock``); fitting a missing one is
    done once even when several requests ask for it together.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def put(self, profile: Profile, detector: Detector) -> None:
        with self._lock:
            self._entries[profile.name] = _Entry(profile.uid, detector, threading.Lock())
            self._entries.move_to_end(profile.name)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def evict(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def _lookup(self, profile: Profile) -> _Entry | None:
        with self._lock:
            e = self._entries.get(profile.name)
            if e is not None and e.uid == profile.uid:
                self._entries.move_to_end(profile.name)
                return e
            return None

    def get(self, profile: Profile, build: Callable[[], Detector]) -> _Entry:
        e = self._lookup(profile)
        if e is not None:
            return e
        with self._lock:
            bl = self._building.setdefault(profile.name, threading.Lock())
        with bl:
            e = self._lookup(profile)
            if e is None:
                self.put(profile, build())
                e = self._lookup(profile)
        assert e is not None
        return e

    def __len__(self) -> int:
        return len(self._entries)


class InspectionEngine:
    """Scores images with a profile's detector and records every result.

    Args:
        data_dir: where images and artifacts are written.
        profiles: the profile store.
        store: the results store.
        cache_size: fitted detectors kept in memory.
    """

    def __init__(
        self, data_dir: str | Path, profiles: ProfileStore, store: ResultStore, cache_size: int = 4
    ) -> None:
        self.data_dir = Path(data_dir)
        self.profiles = profiles
        self.store = store
        self.cache = DetectorCache(cache_size)

    def _refit(self, profile: Profile) -> Detector:
        t0 = time.perf_counter()
        model = self.profiles.model_path(profile)
        if model is not None:  # saved with the profile: no refit after a restart
            from anomalens.model_file import ModelFileError, load_detector

            try:
                det = load_detector(model)
                log.info("loaded profile %s in %.2f s", profile.name, time.perf_counter() - t0)
                return det
            except (ModelFileError, OSError, ValueError, RuntimeError) as exc:
                if not profile.normals:
                    raise ServiceError(
                        500, "model_failed", f"profile {profile.name!r}: {exc}"
                    ) from exc
                log.warning("profile %s: %s; refitting from its normal images", profile.name, exc)
        try:
            det = profile.make_detector()
            normals = self.profiles.load_normals(profile)
            det.fit(normals or None, category=profile.category)
        except Exception as exc:
            raise ServiceError(
                500, "refit_failed", f"profile {profile.name!r} could not be restored: {exc}"
            ) from exc
        log.info("refitted profile %s in %.2f s", profile.name, time.perf_counter() - t0)
        return det

    def warm(self, profile: Profile) -> None:
        """Fit (or find) the profile's detector now."""
        self.cache.get(profile, lambda: self._refit(profile))

    def inspect(
        self,
        profile: Profile,
        images: Sequence[DecodedImage],
        *,
        job_id: str | None = None,
        progress: ProgressFn | None = None,
        batch_size: int = 8,
        queued_at: float | None = None,
    ) -> list[dict[str, Any]]:
        """Score ``images``, write their files, record them; returns the stored records.

        Batch methods (MuSc) score all images of the call together. Each record's ``seconds``
        is its own compute time (its share of the batch's scoring plus writing its files);
        ``queue_seconds`` the wait from ``queued_at`` (``time.time()`` of the request or job
        submission; default now) until its batch's scoring began.
        """
        arrived = time.time() if queued_at is None else queued_at
        entry = self.cache.get(profile, lambda: self._refit(profile))
        thr = profile.threshold_obj()
        out: list[dict[str, Any]] = []
        for sl in entry.detector.batch_slices(len(images), batch_size):
            chunk = list(images[sl])
            with entry.lock:
                t0 = time.perf_counter()
                queue_seconds = max(0.0, time.time() - arrived)
                try:
                    scores, maps = entry.detector.predict([im.array for im in chunk]).to_numpy()
                except ValueError as exc:
                    raise ServiceError(422, "predict_failed", f"{profile.method}: {exc}") from exc
            per_image = (time.perf_counter() - t0) / len(chunk)
            records = []
            for im, score, amap in zip(chunk, scores, maps):
                t1 = time.perf_counter()
                paths = self._write_files(profile, im, amap, float(score), thr)
                records.append(
                    {
                        "profile": profile.name,
                        "profile_uid": profile.uid,
                        "file_name": im.file_name,
                        "sha256": im.sha256,
                        "score": float(score),
                        "verdict": thr.decide(float(score)),
                        "threshold": float(thr.value),
                        "seconds": per_image + time.perf_counter() - t1,
                        "queue_seconds": queue_seconds,
                        "job_id": job_id,
                        **paths,
                    }
                )
            ids = self.store.add(records)
            stored = [self.store.get(i) for i in ids]
            done = [r for r in stored if r is not None]
            out.extend(done)
            if progress is not None:
                progress(done)
        return out

    def _write_files(
        self,
        profile: Profile,
        im: DecodedImage,
        amap: np.ndarray,
        score: float,
        thr: Threshold,
    ) -> dict[str, str]:
        sha = im.sha256
        rel_image = f"images/{sha[:2]}/{sha}.png"
        base = f"artifacts/{profile.uid}/{sha}"
        rels = {
            "image_path": rel_image,
            "overlay_path": f"{base}_overlay.png",
            "heatmap_path": f"{base}_heatmap.png",
            "mask_path": f"{base}_mask.png",
        }
        if not (self.data_dir / rel_image).exists():
            atomic_save_png(self.data_dir / rel_image, im.array)
        if all((self.data_dir / r).exists() for r in rels.values()):
            return rels  # same image, same profile: same outputs
        targets = {kind: rels[f"{kind}_path"] for kind in ("overlay", "heatmap", "mask")}
        judged = judge_image(im.array, amap, score, thr)
        write_result_images(self.data_dir, targets, im.array, judged, thr)
        return rels
