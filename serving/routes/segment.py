"""Segmenting: a query against inline supports (/v1/segment), against a registered set
(/v1/support-sets/{name}/segment), and against several classes at once (/v1/label-map: one label map)."""
from __future__ import annotations

import asyncio
from typing import Literal, Optional

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel

from ..inputs import PixelBudget, UserError, check_set_name
from ..labelmap import check_background_threshold, check_classes
from ..service import Service, answer_labels, one_query, owned, service

router = APIRouter()
Format = Literal["png", "json", "overlay"]
THRESHOLD_DOC = ("binarise masks that are not 0/1 or 0/255 (JPEG, anti-aliased): object where the value is at "
                 "least this fraction of white, 0 < t < 1; without it such masks are refused")
FORMAT_DOC = "png: the mask; overlay: the query with the mask drawn; json: COCO RLE"


class RLE(BaseModel):
    size: list[int]
    counts: str


class SegmentJSON(BaseModel):
    """format=json: the mask at the query's resolution as COCO RLE (pycocotools.mask.decode reads it)."""
    height: int
    width: int
    area: int
    rle: RLE
    backend: str


class ErrorBody(BaseModel):
    error: str


class LabelClass(BaseModel):
    id: int
    name: str
    area: int
    rle: RLE


class LabelMapJSON(BaseModel):
    """format=json of /v1/label-map: one COCO RLE mask per class (serving/labelmap.py)."""
    height: int
    width: int
    background_threshold: float
    classes: list[LabelClass]
    backend: str


SEGMENT_RESPONSES = {
    200: {"description": "format=png (default): the mask as a PNG at the query's resolution, 0 background and 255 "
                         "object, its area in the X-Foreground-Area header; format=overlay: the query as a PNG with the "
                         "mask filled translucent cyan and outlined; format=json: the mask as COCO RLE.",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": SegmentJSON.model_json_schema()}}},
    **{code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "an input that cannot be used (unreadable image, mask of another size, no object in a mask, ...)"),
        (401, "API key missing or wrong (when the service has keys)"), (404, "no support set of that name"),
        (408, "the body did not arrive in time"), (413, "too many bytes or pixels"),
        (422, "a field missing or of the wrong type (format outside png/json/overlay, mask_threshold outside (0, 1))"),
        (503, "model loading, or too many requests in progress (Retry-After)"), (504, "inference timed out"))},
}
LABEL_MAP_RESPONSES = {
    200: {"description": "format=png (default): the label map as a palette PNG at the query's resolution, pixel value = "
                         "class id (1 = the first class given, 0 background), the class names in order in the X-Classes "
                         "header (JSON); format=overlay: the query with each class filled in its colour; format=json: "
                         "one COCO RLE mask per class.",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": LabelMapJSON.model_json_schema()}}},
    **{k: v for k, v in SEGMENT_RESPONSES.items() if k != 200}}


@router.post("/v1/segment", summary="Segment a query given k support images and their masks",
             responses=SEGMENT_RESPONSES, response_model=None)
async def segment(request: Request, query: UploadFile = File(..., description="the image to segment"),
                  supports: list[UploadFile] = File(default=[], description="k support images"),
                  masks: list[UploadFile] = File(default=[], description="their masks, in the same order"),
                  format: Format = Form("png", description=FORMAT_DOC),
                  mask_threshold: Optional[float] = Form(None, gt=0, lt=1, description=THRESHOLD_DOC),
                  svc: Service = Depends(service)):
    await one_query(request)
    budget = PixelBudget(svc.limits.max_request_pixels)
    s, m, _ = await svc.read_supports(supports, masks, budget, mask_threshold)
    return await svc.run_query(query, await svc.encode(s, m), format, budget)


@router.post("/v1/support-sets/{name}/segment", summary="Segment a query against a registered support set",
             responses=SEGMENT_RESPONSES, response_model=None)
async def segment_named(request: Request, name: str, query: UploadFile = File(..., description="the image to segment"),
                        format: Format = Form("png", description=FORMAT_DOC), svc: Service = Depends(service)):
    svc.backend()
    await one_query(request)
    feats = svc.store.get(*owned(request, name))
    if feats is None:
        raise UserError(f"no support set named {name[:64]!r}", 404)
    return await svc.run_query(query, feats, format, PixelBudget(svc.limits.max_request_pixels))


@router.post("/v1/label-map", summary="Segment a query against several classes: one label map",
             responses=LABEL_MAP_RESPONSES, response_model=None)
async def segment_classes(request: Request, query: UploadFile = File(..., description="the image to segment"),
                          sets: list[str] = Form(default=[], description="registered support sets, one class each "
                                                 "(class i = the i-th set, named after it)"),
                          supports: list[UploadFile] = File(default=[], description="inline classes: their support "
                                                            "images"),
                          masks: list[UploadFile] = File(default=[], description="their masks, in the same order"),
                          classes: list[str] = Form(default=[], description="the class of each inline support, same "
                                                    "order; a class's supports are its shots"),
                          background_threshold: float = Form(0.5, gt=0, lt=1, description="a pixel is background "
                                                             "unless some class's foreground probability is above "
                                                             "this; 0.5 is the single-class rule"),
                          format: Format = Form("png", description="png: the label map (palette PNG, value = class "
                                                "id, 0 background); overlay: the query with each class in its "
                                                "colour; json: one COCO RLE per class"),
                          mask_threshold: Optional[float] = Form(None, gt=0, lt=1, description=THRESHOLD_DOC),
                          svc: Service = Depends(service)):
    b = svc.backend()
    await one_query(request)
    check_background_threshold(background_threshold)
    if len(classes) != len(supports):
        raise UserError(f"{len(supports)} inline support image(s) but {len(classes)} class name(s): give one "
                        "`classes` field per support, in the same order")
    if len(masks) != len(supports):
        raise UserError(f"{len(supports)} inline support image(s) but {len(masks)} mask(s); give one mask per support")
    inline = list(dict.fromkeys(classes))
    names = check_classes(list(sets) + inline)
    feats = []
    for name in sets:
        check_set_name(name)
        f = svc.store.get(*owned(request, name))
        if f is None:
            raise UserError(f"no support set named {name[:64]!r}: register it first (PUT /v1/support-sets/{name})", 404)
        feats.append(f)
    budget = PixelBudget(svc.limits.max_request_pixels)
    for name in inline:
        pick = [i for i, c in enumerate(classes) if c == name]
        s, m, _ = await svc.read_supports([supports[i] for i in pick], [masks[i] for i in pick], budget,
                                          mask_threshold, what=f"class {name!r}: ")
        feats.append(await svc.encode(s, m))
    # the label map's work grows with its classes: each is a full-resolution plane to resize and compare
    x, valid, kept = await svc.prepare_query(query, format, budget, classes=len(names))
    # one decode per class, queued together: classes with the same shot count share a backend call
    logits = await asyncio.gather(*(svc.decode(x, f) for f in feats))
    return await svc.off_loop(answer_labels, [l[0] for l in logits], valid, kept, format, names, background_threshold,
                              b.name)
