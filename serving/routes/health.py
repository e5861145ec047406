"""Liveness, readiness, Prometheus metrics and the page."""
from __future__ import annotations

import json
from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..labelmap import color
from ..page import page_and_csp
from ..service import Service, service

router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(svc: Service = Depends(service)):
    if not svc.state["ready"]:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready", "backend": svc.state["backend"].name, "input_size": svc.state["backend"].size}


@router.get("/metrics")
async def metrics(svc: Service = Depends(service)):
    return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/ui", include_in_schema=False)
async def ui(svc: Service = Depends(service)):
    """The page (serving/ui.html): its own hashed script only, requests only to this service (serving/page.py)."""
    limits = svc.limits
    b = svc.state["backend"] if svc.state["ready"] else None
    limits_js = json.dumps({"max_pixels": limits.max_pixels, "max_shots": b.shots or limits.max_shots if b else
                            limits.max_shots, "max_upload_bytes": limits.max_upload_bytes,
                            "input_size": b.size if b else None, "palette": [color(i) for i in range(33)]})
    html, csp = page_and_csp(limits_js)
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"})
