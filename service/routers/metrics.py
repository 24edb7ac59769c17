"""``GET /metrics`` in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ..auth import MetricsScope
from ..metrics import CONTENT_TYPE

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, _: MetricsScope) -> PlainTextResponse:
    """Request counts, latency and batch-size histograms, versions served, rejections."""
    text = request.app.state.mecs.metrics.render()
    return PlainTextResponse(text, media_type=CONTENT_TYPE)
