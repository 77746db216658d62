"""Response models of the HTTP API (they make the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field, field_serializer

__all__ = [
    "ErrorOut",
    "HealthOut",
    "HistoryPage",
    "InspectOut",
    "InspectionOut",
    "JobOut",
    "MethodOut",
    "ProfileOut",
    "record_to_out",
]


class _Model(BaseModel):
    @field_serializer("*", when_used="json")
    def _utc(self, v: Any) -> Any:
        if isinstance(v, datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=timezone.utc)
            return (
                v.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            )
        return v


class ErrorOut(_Model):
    error: str = Field(description="short reason code, e.g. not_found, bad_image, too_large")
    message: str = Field(description="what went wrong, for people")
    fields: list[dict[str, Any]] | None = Field(None, description="invalid request fields")


class HealthOut(_Model):
    status: str
    version: str
    database: str
    auth: bool = Field(description="whether API calls need a token")
    max_upload_mb: float
    sync_batch_limit: int


class MethodOut(_Model):
    name: str
    learning_type: str


class ProfileOut(_Model):
    name: str
    uid: str
    method: str
    options: dict[str, Any]
    learning_type: str
    num_normals: int
    normal_names: list[str]
    threshold: dict[str, Any] = Field(
        description="Threshold.to_dict(): value, pixel_value, method, ..."
    )
    policy: dict[str, Any]
    created_at: str
    detector_config: dict[str, Any]


class Links(_Model):
    image: str
    overlay: str
    heatmap: str
    mask: str


class InspectionOut(_Model):
    id: int
    profile: str
    file_name: str
    sha256: str
    score: float
    verdict: str = Field(description="normal or anomalous")
    threshold: float
    seconds: float = Field(
        description="compute time of this image: its share of the scoring plus writing its files"
    )
    queue_seconds: float | None = Field(
        None,
        description="wait from the request's arrival (or the job's submission) until scoring "
        "began: job queue, a busy detector, decoding",
    )
    created_at: datetime
    job_id: str | None = None
    links: Links


class UploadErrorOut(_Model):
    file_name: str
    message: str


class InspectOut(_Model):
    profile: str
    results: list[InspectionOut]
    errors: list[UploadErrorOut] = Field(description="uploads that were not images")
    seconds: float = Field(description="wall time of the request")


class JobOut(_Model):
    id: str
    profile: str
    status: str = Field(description="queued, running, done or failed")
    total: int
    done: int
    results: list[InspectionOut]
    errors: list[UploadErrorOut]
    message: str | None = None
    created_at: datetime
    finished_at: datetime | None = None
    links: dict[str, str]


class HistoryPage(_Model):
    items: list[InspectionOut]
    total: int
    limit: int
    offset: int


def record_to_out(rec: dict[str, Any]) -> InspectionOut:
    """A store record as an API object with file links."""
    base = f"/api/results/{rec['id']}"
    return InspectionOut(
        id=rec["id"],
        profile=rec["profile"],
        file_name=rec["file_name"],
        sha256=rec["sha256"],
        score=rec["score"],
        verdict=rec["verdict"],
        threshold=rec["threshold"],
        seconds=rec["seconds"],
        queue_seconds=rec.get("queue_seconds"),
        created_at=rec["created_at"],
        job_id=rec.get("job_id"),
        links=Links(
            image=f"{base}/image.png",
            overlay=f"{base}/overlay.png",
            heatmap=f"{base}/heatmap.png",
            mask=f"{base}/mask.png",
        ),
    )
