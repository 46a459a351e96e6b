"""The poll document of a job (SPEC 4.2), folded from the job's and its settlement's events.

Pure functions of the events only (no clock, no configuration), so a rebuild from the log gives
byte-identical documents. Values that depend on the reader or the time (the short-lived ``url``,
``Retry-After``) are added when a document is served, never stored.
"""

from __future__ import annotations

from typing import Any

from domain.aggregates import Job, Settlement
from domain.money import to_json

JobDoc = dict[str, Any]


def job_path(job_id: str) -> str:
    return f"/v1/video/generations/{job_id}"


def new_doc(job_id: str, e: Job.Created) -> JobDoc:
    return {
        "id": job_id,
        "object": "media.job",
        "kind": "video",
        "status": "queued",
        "created": e.created,
        "expires_at": e.expires_at,
        "model": e.request["model"],
        "estimated_cost_usdc": to_json(e.estimated_cost),
        "max_cost_usdc": to_json(e.max_cost),
        "poll_url": job_path(job_id),
        "cancel_url": job_path(job_id),
        "metadata": e.request.get("metadata") or {},
        "progress": 0.0,
        "results": [],
        "usage": {"seller_cost_usdc": "0", "buyer_cost_usdc": "0", "settlement_status": "pending"},
    }


def apply_job_event(doc: JobDoc, e: Any) -> None:
    """Fold one job event into its document in place."""
    if isinstance(e, Job.Dispatched):
        doc["status"] = "submitted"
    elif isinstance(e, Job.DispatchStarted):
        attempt = e.attempt
        doc["usage"] = {
            **doc["usage"],
            "seller_cost_usdc": to_json(attempt["seller_cost"]),
            "buyer_cost_usdc": to_json(attempt["buyer_cost"]),
        }
    elif isinstance(e, Job.Progressed):
        doc["status"] = "running"
        doc["progress"] = e.progress
    elif isinstance(e, Job.ArtifactStored):
        a = e.artifact
        doc["results"].append(
            {
                "artifact_index": a["index"],
                "download_url": f"/v1/media/artifacts/{doc['id']}/{a['index']}",
                "content_type": a["content_type"],
                "duration_seconds": a["duration_seconds"],
                "width": a["width"],
                "height": a["height"],
                "bytes": a["bytes"],
            }
        )
    elif isinstance(e, Job.Succeeded):
        doc["status"] = "succeeded"
        doc["progress"] = 1.0
    elif isinstance(e, Job.Failed):
        doc["status"] = "failed"
        doc["error"] = {"code": e.code, "message": e.message, "retryable": e.retryable}
        _clear_pending_usage(doc)
    elif isinstance(e, Job.Canceled):
        doc["status"] = "canceled"
        if not e.after_dispatch:
            _clear_pending_usage(doc)
    elif isinstance(e, Job.Expired):
        doc["status"] = "expired"
        _clear_pending_usage(doc)
    elif isinstance(e, Job.Refused):
        _clear_pending_usage(doc)
    elif isinstance(e, Job.ArtifactPurged):
        for result in doc["results"]:
            result["expired"] = True


def _clear_pending_usage(doc: JobDoc) -> None:
    if doc["usage"]["settlement_status"] == "pending":
        doc["usage"] = {**doc["usage"], "seller_cost_usdc": "0", "buyer_cost_usdc": "0"}


def apply_settlement_event(doc: JobDoc, e: Any) -> None:
    if isinstance(e, Settlement.Settled):
        doc["usage"] = {
            "seller_cost_usdc": to_json(e.seller_cost),
            "buyer_cost_usdc": to_json(e.charged),
            "settlement_status": "confirmed",
        }
    elif isinstance(e, Settlement.Released):
        doc["usage"] = {
            "seller_cost_usdc": "0",
            "buyer_cost_usdc": "0",
            "settlement_status": "released",
        }
