"""Registered support sets: PUT (encoded once, stored), GET the list, DELETE; owned by the API key."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from ..inputs import PixelBudget, UserError, check_set_name
from ..service import Service, owned, service
from ..store import QuotaError
from .segment import THRESHOLD_DOC

router = APIRouter()


@router.put("/v1/support-sets/{name}", status_code=201, summary="Register a named support set (encoded once)")
async def register(request: Request, name: str, supports: list[UploadFile] = File(default=[]),
                   masks: list[UploadFile] = File(default=[]),
                   mask_threshold: Optional[float] = Form(None, gt=0, lt=1, description=THRESHOLD_DOC),
                   svc: Service = Depends(service)):
    check_set_name(name)
    s, m, meta = await svc.read_supports(supports, masks, PixelBudget(svc.limits.max_request_pixels), mask_threshold)
    feats = await svc.encode(s, m)
    try:
        await svc.off_loop(svc.store.put, *owned(request, name), feats, {"shots": int(s.shape[1]), "masks": meta})
    except QuotaError as e:
        raise UserError(str(e), e.status) from e
    return {"name": name, "shots": int(s.shape[1])}


@router.get("/v1/support-sets")
async def list_sets(request: Request, svc: Service = Depends(service)):
    svc.backend()
    return {"support_sets": svc.store.names(request.scope.get("svf.owner", ""))}


@router.delete("/v1/support-sets/{name}")
async def delete_set(request: Request, name: str, svc: Service = Depends(service)):
    svc.backend()
    if not await svc.off_loop(svc.store.delete, *owned(request, name)):
        raise UserError(f"no support set named {name[:64]!r}", 404)
    return {"deleted": name}
