"""The registered model as an MLflow pyfunc: images in, masks out, so that

    mlflow models serve -m "models:/svf-fss-pfenet@synthetic-fold0-1shot-pfenet-svf" --env-manager local -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d @request.json

answers like the service's /v1/segment. One row per query: ``query`` (the image's bytes, base64: PNG, JPEG,
...), and either ``supports`` + ``masks`` (lists of base64 images and their 0/1 or 0/255 masks, k shots) or
``support_set`` (a set registered with the service, read from the folder in SVF_FSS_STORE: the service's
--store). Parameter ``mask_threshold`` (0 = masks must be binary) binarises JPEG or anti-aliased masks. Each
answer row: ``mask`` (a base64 PNG, 0 background / 255 object at the query's resolution), ``area``,
``height``, ``width``. Images and masks are read, and each row is limited, as the service reads and limits
one request (serving/inputs.py: its default shots and pixels); a set is read from the store when a row
names it, so sets registered, replaced or deleted after the server started are served as they are now. A
bad row is a 400 naming the row and what is wrong.

The model's files are the export's two ONNX graphs (support encoder, query decoder) run by ONNX Runtime;
the serving code it runs travels with the model (``SERVING_FILES``); its preprocessing (pipeline/) and the
ONNX session (export/) come from the svf-fss package of the environment that serves it (`--env-manager
local` in the project's .venv). Carrying those too re-imported them when MLflow checked the input example
at logging: 9.2 instead of 4.4 s per export on 2 cores.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

ROOT = Path(__file__).resolve().parents[1]
# the part of serving/ the model runs (the export stage depends on exactly these, dvc.yaml)
SERVING_FILES = ("__init__.py", "mlflow_model.py", "backends.py", "inputs.py", "model_files.py", "store.py")


def _b64(text, what: str) -> bytes:
    from serving.inputs import UserError
    if not isinstance(text, str) or not text:
        raise UserError(f"{what} is missing or not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UserError(f"{what} is not valid base64 ({e})") from e


def _listed(v) -> list:
    """A row's list column; absent (None, or the NaN pandas fills a missing value with) is empty."""
    return [] if v is None or (isinstance(v, float) and v != v) else list(v)


class FewShotSegmenter(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from serving.backends import OnnxBackend
        from serving.store import SupportStore, feature_shapes, fingerprint
        b = self.backend = OnnxBackend(Path(context.artifacts["model_dir"]))
        self.store = None
        if os.environ.get("SVF_FSS_STORE"):     # the sets the service registered with this model (same fingerprint)
            self.store = SupportStore(os.environ["SVF_FSS_STORE"], fingerprint(b.kind, b.files),
                                      feature_shapes=feature_shapes(b))

    def _features(self, row: dict, where: str, threshold, budget):
        from serving.inputs import MAX_PIXELS, MAX_SHOTS, UserError, check_set_name, check_shots, prepare_supports
        name = row.get("support_set")
        if name is None or name == "" or (isinstance(name, float) and name != name):      # absent
            name = None
        supports, masks = _listed(row.get("supports")), _listed(row.get("masks"))
        if name is not None:
            if supports or masks:
                raise UserError("give supports + masks or a support_set, not both")
            check_set_name(name)
            if self.store is None:
                raise UserError(f"support_set {name!r} given but this server has no store (start it with "
                                "SVF_FSS_STORE=<the service's --store folder>)")
            feats = self.store.current("", name)
            if feats is None:
                raise UserError(f"no support set named {name!r} in {os.environ['SVF_FSS_STORE']}")
            return feats
        if not supports and not masks:
            raise UserError("no supports and no support_set: give supports + masks (k shots) or a registered set's "
                            "name")
        check_shots(len(supports), len(masks), MAX_SHOTS, self.backend.shots)
        blobs = [(f"{where} support {i + 1}", _b64(s, f"{where} support {i + 1}"), f"{where} mask {i + 1}",
                  _b64(m, f"{where} mask {i + 1}")) for i, (s, m) in enumerate(zip(supports, masks))]
        s, m, _ = prepare_supports(blobs, self.backend.size, MAX_PIXELS, budget, threshold)
        return self.backend.encode(s, m)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        from serving.inputs import (MAX_PIXELS, MAX_REQUEST_PIXELS, PixelBudget, UserError, check_threshold, mask_of,
                                    png_bytes, query_tensor, read_image)
        try:
            threshold = check_threshold(float((params or {}).get("mask_threshold") or 0) or None)
        except (UserError, TypeError, ValueError) as e:
            raise MlflowException(str(e), INVALID_PARAMETER_VALUE) from e
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        out = []
        for r, row in enumerate(rows):
            where = f"row {r}"
            try:
                budget = PixelBudget(MAX_REQUEST_PIXELS)
                feats = self._features(row, where, threshold, budget)
                img = read_image(_b64(row.get("query"), f"{where} query"), f"{where} query", MAX_PIXELS, budget)
                x, valid = query_tensor(img, self.backend.size)
                mask = mask_of(self.backend.decode(x, feats)[0], valid, img.shape[:2])
            except UserError as e:
                text = str(e) if str(e).startswith(f"{where} ") else f"{where}: {e}"     # every message names the row
                raise MlflowException(text, INVALID_PARAMETER_VALUE) from e
            out.append({"mask": base64.b64encode(png_bytes(mask * 255)).decode("ascii"), "area": int(mask.sum()),
                        "height": int(mask.shape[0]), "width": int(mask.shape[1])})
        return pd.DataFrame(out, columns=["mask", "area", "height", "width"])


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "query"), ColSpec(Array(DataType.string), "supports", required=False),
                       ColSpec(Array(DataType.string), "masks", required=False),
                       ColSpec(DataType.string, "support_set", required=False)]),
        outputs=Schema([ColSpec(DataType.string, "mask"), ColSpec(DataType.long, "area"),
                        ColSpec(DataType.long, "height"), ColSpec(DataType.long, "width")]),
        params=ParamSchema([ParamSpec("mask_threshold", DataType.double, 0.0)]))


def example(size: int) -> dict:
    """One 1-shot request from the project's generated images (base64 PNGs), for the model's input example."""
    from PIL import Image

    from pipeline.data.synthetic import generate_image

    def b64(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    (s, slab), (q, _) = generate_image(0, "val", size, 3), generate_image(1, "val", size, 3)
    cls = int(next(c for c in np.unique(slab) if c not in (0, 255)))
    return {"query": [b64(q)], "supports": [[b64(s)]], "masks": [[b64(np.where(slab == cls, 255, 0).astype(np.uint8))]]}


def log_pyfunc(model_dir: Path, registered_name: str | None, pip_requirements: list[str], size: int):
    """Log the model folder's ONNX graphs as the pyfunc (name "model") in the active run; returns the ModelInfo."""
    import pandas as pd
    stage = Path(tempfile.mkdtemp(prefix="svf-pyfunc-"))
    try:
        (stage / "model").mkdir()
        (stage / "serving").mkdir()
        for f in ("support_encoder.onnx", "query_decoder.onnx"):
            shutil.copy2(model_dir / f, stage / "model" / f)
        for f in SERVING_FILES:
            shutil.copy2(ROOT / "serving" / f, stage / "serving" / f)
        return mlflow.pyfunc.log_model(
            name="model", python_model=FewShotSegmenter(), artifacts={"model_dir": str(stage / "model")},
            code_paths=[str(stage / "serving")], signature=signature(), input_example=pd.DataFrame(example(2 * size)),
            pip_requirements=pip_requirements, registered_model_name=registered_name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
