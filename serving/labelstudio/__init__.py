"""Label Studio: pre-annotations from the few-shot model, and an ML backend whose support sets are your annotations.

    python -m serving.labelstudio --model-dir models/fold0/1shot --port 9090 --store labelstudio-sets/ \
        --ls-url http://127.0.0.1:8080

Connect it in a project with a BrushLabels config (Settings > Model > http://127.0.0.1:9090). Every annotation
submitted (or updated) becomes an example of each label it paints: the ``--shots`` most recent examples of a
label are its support set (stored under --store, reloaded at start: examples.py; a BAM model takes exactly
its trained shot count). ``/predict`` pre-annotates a task with every label that has a support set: one
label map over them (serving/labelmap.py), one brush region per label. The API as Label Studio calls it:
api.py. Images are read only from the Label Studio it is pointed at and the hosts the operator allows,
its token only ever sent to that Label Studio: images.py. Brush regions travel in Label Studio's own RLE:
brush.py (``serving.predict --format labelstudio`` writes the same regions into a task file).
"""
from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Request

from .brush import brush_mask, brush_results, rle_decode, rle_encode

log = logging.getLogger("serving.labelstudio")
__all__ = ["brush_mask", "brush_results", "create_app", "rle_decode", "rle_encode"]


def create_app(model_dir: str | Path, backend: str = "auto", store: str | Path | None = None, shots: int = 5,
               ls_url: str | None = None, ls_token: str | None = None, threshold: float = 0.5, *,
               allow_image_hosts=(), allowed_hosts=("*",), basic_auth_user: str | None = None,
               basic_auth_pass: str | None = None, max_body: int = 32 << 20, max_pixels: int = 4096 * 4096,
               fetch_deadline: float = 20.0, port: int | None = None):
    """The backend over ``model_dir`` (see ``python -m serving.labelstudio --help`` for each argument)."""
    from fastapi import Depends
    from fastapi.responses import JSONResponse
    from fastapi_offline import FastAPIOffline

    from ..app import Measured
    from ..backends import load_backend
    from ..guard import Guard
    from ..inputs import UserError
    from ..labelmap import check_background_threshold
    from .api import Backend, basic_auth, router
    from .examples import Examples
    from .client import LabelStudio
    from .images import ImageSource

    check_background_threshold(threshold)
    model = load_backend(model_dir, backend)
    ls = LabelStudio(ls_url, ls_token, fetch_deadline)
    images = ImageSource(ls, allow_image_hosts, max_pixels=max_pixels, deadline=fetch_deadline)
    auth = (basic_auth_user, basic_auth_pass) if basic_auth_user else None
    b = Backend(model, Examples(Path(store) if store else None, model, shots), images, threshold, auth, port)
    if ls.url and ls.token:
        b.sync.start(check_token, b)
    app = FastAPIOffline(title="svf-fss Label Studio ML backend")

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status,
                            headers={"www-authenticate": "Basic"} if exc.status == 401 else None)

    check_auth = basic_auth(basic_auth_user, basic_auth_pass)

    @app.get("/health")
    @app.get("/")
    def health(request: Request):
        """UP while the model serves; to a caller with the basic auth (or when there is none), ``problems``: what
        keeps Label Studio's annotations or images from reaching the backend, each with what to change."""
        out = {"status": "UP", "model_class": "svf-fss", "backend": model.name}
        try:
            check_auth(request)
        except UserError:
            return out
        return {**out, "problems": sorted(b.sync.problems.values())}

    app.include_router(router(b, check_auth))
    app.add_api_route("/metrics", b.metrics.answer, methods=["GET"], dependencies=[Depends(check_auth)])
    app.add_middleware(Measured, observe=b.metrics.observe)
    app.add_middleware(Guard, allowed_hosts=list(allowed_hosts), max_body=max_body)
    app.state.examples = b.examples
    return app


def check_token(b) -> None:
    """At start: does Label Studio take the token? (Label Studio 1.23 turns legacy tokens off: then only a
    personal access token works.)"""
    try:
        r = b.ls.request("GET", "/api/current-user/whoami")
        if r.status_code == 200:
            b.sync.problem("token", None)
            return
        what = f"HTTP {r.status_code}: {r.text[:200]}"
    except Exception as e:
        what = f"{type(e).__name__}: {e}"
    kind = "personal access token" if b.ls.personal else "legacy token (Label Studio 1.23 disables these by default)"
    b.sync.problem("token", f"Label Studio at {b.ls.url} refuses the {kind} ({what}): give --ls-token a personal "
                    "access token (Account & Settings > Personal Access Token)")
