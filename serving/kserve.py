"""Open Inference Protocol (KServe v2, Triton's HTTP API) beside the service's own /v1 API.

GET  /v2                                  server metadata
GET  /v2/health/live, /v2/health/ready
GET  /v2/models/{name}[/versions/1]       model metadata: tensors, datatypes, shapes (-1 dynamic)
GET  /v2/models/{name}[/versions/1]/ready
POST /v2/models/{name}[/versions/1]/infer JSON tensors, or the binary tensor extension
                                          (JSON header of Inference-Header-Content-Length bytes, then raw data)

The models, tensor names and shapes are export/triton.py's, as in the exported Triton repository:
``svf_fss`` (the whole network), ``svf_fss_support_encoder`` and ``svf_fss_query_decoder`` (a client
caches a support set's features and sends only queries). Tensors are preprocessed FP32 (the ONNX
model's inputs: normalised images at the model's size), not image files: that is the /v1 API's job.
The split models need a backend that has them (ONNX Runtime, PyTorch); a TensorRT engine or an
AOTInductor package holds the whole network, so with those they answer 503 saying so. API keys and limits are the /v1 API's (guard.py).
"""
from __future__ import annotations

import asyncio
import json
import math

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from export.triton import DECODER, ENCODER, FULL, signatures

from .inputs import UserError, binary_mask

HEADER = "inference-header-content-length"
VERSION = "1"


class Protocol:
    """The three models over one backend: their signatures, validation, and inference."""

    def __init__(self, backend, feature_shapes: list[tuple[str, list[int]]], max_shots: int,
                 max_json_bytes: int = 2 << 20):
        self.backend, self.max_shots = backend, max_shots
        self.max_json_bytes, self.max_json_values = max_json_bytes, max_json_bytes // 8   # ~8 characters a float
        self.split = backend.features is not None
        self.signatures = signatures(backend.size, backend.shots or -1, feature_shapes)

    def metadata(self, name: str) -> dict:
        self.check_model(name)
        inputs, outputs = self.signatures[name]
        tensors = lambda ts: [{"name": n, "datatype": "FP32", "shape": s} for n, s in ts]   # noqa: E731
        return {"name": name, "versions": [VERSION], "platform": f"svf-fss ({self.backend.name})",
                "inputs": tensors(inputs), "outputs": tensors(outputs)}

    def check_model(self, name: str) -> None:
        if name not in self.signatures:
            raise UserError(f"unknown model {name!r}; this service has {', '.join(self.signatures)}", 404)
        if name != FULL and not self.split:
            raise UserError(f"model {name!r} is not available with the {self.backend.name} backend, whose model holds the "
                            "whole network in one piece; start the service with --backend onnxruntime (or torch) for "
                            "the split models", 503)

    def parse(self, name: str, body: bytes, header_length: int | None) -> tuple[dict, dict]:
        """(inputs by name as float32 arrays of their declared shapes, the request's JSON)."""
        self.check_model(name)
        n = len(body) if header_length is None else header_length
        if not 0 < n <= len(body):
            raise UserError(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        try:
            request = json.loads(body[:n])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"the inference request is not JSON: {e}")
        except RecursionError:
            raise UserError("the inference request is JSON nested too deep to read")
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise UserError('the inference request needs "inputs": a list of tensors')
        self.check_outputs(name, request)
        binary, offset = memoryview(body)[n:], 0
        declared = dict(self.signatures[name][0])
        got: dict[str, np.ndarray] = {}
        for t in request["inputs"]:
            if not isinstance(t, dict):
                raise UserError("each input is an object with name, shape, datatype and data")
            tname, shape, dtype = t.get("name"), t.get("shape"), t.get("datatype")
            if not isinstance(tname, str) or tname not in declared:
                raise UserError(f"model {name} has no input {tname!r}; its inputs: {', '.join(declared)}")
            if tname in got:
                raise UserError(f"input {tname} given twice")
            if dtype != "FP32":
                raise UserError(f"input {tname} is {dtype}; every tensor of this model is FP32")
            if not (isinstance(shape, list) and shape and
                    all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
                raise UserError(f"input {tname}: shape must be a list of positive integers, got {shape!r}")
            count = math.prod(shape)            # Python integers: no overflow to 0
            if count > MAX_VALUES:
                raise UserError(f"input {tname}: shape {shape} holds {count} values, more than {MAX_VALUES}")
            size = parameters(t, f"input {tname}").get("binary_data_size")
            if size is not None:
                if isinstance(size, bool) or not isinstance(size, int):
                    raise UserError(f"input {tname}: binary_data_size must be a byte count, got {size!r}")
                if size != 4 * count or offset + size > len(binary):
                    raise UserError(f"input {tname}: {size} bytes of binary data for shape {shape} (needs {4 * count}; "
                                    f"{len(binary) - offset} left in the body)")
                arr = np.frombuffer(binary[offset:offset + size], "<f4").reshape(shape).copy()   # writable
                offset += size
            else:
                try:
                    arr = np.asarray(t.get("data"), np.float32)
                except (TypeError, ValueError):
                    raise UserError(f"input {tname}: data must be numbers")
                if arr.size != count:
                    raise UserError(f"input {tname}: {arr.size} values for shape {shape} ({count} needed)")
                arr = arr.reshape(shape)
            got[tname] = arr
        if offset != len(binary):
            raise UserError(f"{len(binary) - offset} bytes of binary data after the last input")
        missing = [k for k in declared if k not in got]
        if missing:
            raise UserError(f"model {name} needs input(s) {', '.join(missing)}")
        self.check_shapes(name, got, declared)
        if name != ENCODER and not self.binary_output(request, "logits"):
            values = 2 * next(iter(got.values())).shape[0] * self.backend.size ** 2
            if values > self.max_json_values:
                raise UserError(f"the logits of this request are {values} values, more than the {self.max_json_values} sent as "
                                'JSON; ask for them in binary ("parameters": {"binary_data_output": true})')
        if "support_mask" in got:       # /v1's rules: 0/1 (255 ignore) or 0/255, an object in every support
            m = got["support_mask"]
            for b, k in np.ndindex(*m.shape[:2]):
                m[b, k] = binary_mask(m[b, k], f"support_mask[{b}][{k}]", hint="") == 1
        return got, request

    def check_outputs(self, name: str, request: dict) -> None:
        """The request's "parameters" and "outputs", checked before inference runs."""
        flag = parameters(request, "the request").get("binary_data_output")
        if flag is not None and not isinstance(flag, bool):
            raise UserError(f"binary_data_output must be true or false, got {flag!r}")
        wanted = request.get("outputs")
        if wanted is None:
            return
        names = [n for n, _ in self.signatures[name][1]]
        if not isinstance(wanted, list) or not wanted:
            raise UserError(f'"outputs" must be a list of {{"name": ...}} objects (or left out for all); got {wanted!r}')
        for o in wanted:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise UserError(f'each requested output is an object with a "name", got {o!r}')
            if o["name"] not in names:
                raise UserError(f"model {name} has no output {o['name']!r}; its outputs: {', '.join(names)}")
            flag = parameters(o, f"output {o['name']}").get("binary_data")
            if flag is not None and not isinstance(flag, bool):
                raise UserError(f"output {o['name']}: binary_data must be true or false, got {flag!r}")

    def check_shapes(self, name: str, got: dict, declared: dict) -> None:
        batch = {a.shape[0] for a in got.values()}
        if len(batch) > 1:
            raise UserError(f"inputs of model {name} disagree on the batch size: {sorted(batch)}")
        for tname, arr in got.items():
            want = declared[tname]
            if arr.ndim != len(want) or any(w not in (-1, d) for w, d in zip(want, arr.shape)):
                raise UserError(f"input {tname} has shape {list(arr.shape)}; model {name} takes {want} (-1: any)")
        shots = {got[k].shape[1] for k in ("support", "support_mask") if k in got}
        if name == DECODER:         # cached features that keep a shots axis count too
            shots |= {got[f].shape[i] for f, axes in (self.backend.features or {}).items() if f in got
                      for i, a in axes.items() if a == "shots"}
        if len(shots) > 1:
            raise UserError(f"the inputs disagree on the shots: {sorted(shots)}")
        if shots and max(shots) > self.max_shots:
            raise UserError(f"{max(shots)} shots given; at most {self.max_shots} are accepted")

    def infer(self, name: str, x: dict) -> list[tuple[str, np.ndarray]]:
        b = self.backend
        if name == ENCODER:
            return list(zip(b.features, b.encode(x["support"], x["support_mask"])))
        if name == DECODER:
            return [("logits", b.decode(x["query"], tuple(x[f] for f in b.features)))]
        return [("logits", b.decode(x["query"], b.encode(x["support"], x["support_mask"])))]

    @staticmethod
    def binary_output(request: dict, output: str) -> bool:
        """Whether the (checked) request asks for ``output`` in binary."""
        all_binary = parameters(request, "the request").get("binary_data_output", False)
        for o in request.get("outputs") or []:
            if o["name"] == output:
                return parameters(o, "").get("binary_data", all_binary)
        return all_binary

    @staticmethod
    def response(name: str, request: dict, outputs: list[tuple[str, np.ndarray]]) -> Response:
        """JSON data, or binary where the request asked for it (per output, or for all)."""
        wanted = {o["name"] for o in request.get("outputs") or []}    # checked by check_outputs before inference
        head, blobs = {"model_name": name, "model_version": VERSION, "outputs": []}, []
        if "id" in request:
            head["id"] = request["id"]
        for n, arr in outputs:
            if wanted and n not in wanted:
                continue
            arr = np.ascontiguousarray(arr, "<f4")
            t = {"name": n, "datatype": "FP32", "shape": list(arr.shape)}
            if Protocol.binary_output(request, n):
                t["parameters"] = {"binary_data_size": arr.nbytes}
                blobs.append(arr.tobytes())
            else:       # JSON has no NaN or infinity: null stands for them, counted in the output's parameters
                t["data"] = arr.ravel().tolist()
                bad = int(arr.size - np.isfinite(arr).sum())
                if bad:
                    t["data"] = [v if math.isfinite(v) else None for v in t["data"]]
                    t["parameters"] = {"non_finite": bad}
            head["outputs"].append(t)
        text = json.dumps(head).encode()
        if not blobs:
            return Response(text, media_type="application/json")
        return Response(b"".join([text, *blobs]), media_type="application/octet-stream",
                        headers={HEADER: str(len(text))})


def add_routes(app: FastAPI, state: dict, off_loop, timeout_s: float, max_shots: int,
               max_json_bytes: int = 2 << 20) -> None:
    """``state``: the app's (ready, backend); ``off_loop`` runs parsing and encoding in the worker pool."""

    def protocol() -> Protocol:
        if not state["ready"]:
            raise UserError("the model is still loading", 503)
        if "kserve" not in state:
            state["kserve"] = Protocol(state["backend"], state["feature_shapes"], max_shots, max_json_bytes)
        return state["kserve"]

    @app.get("/v2", tags=["Open Inference Protocol"])
    async def server_metadata():
        return {"name": "svf-fss", "version": app.version, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", tags=["Open Inference Protocol"])
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["Open Inference Protocol"])
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        @app.get(prefix, tags=["Open Inference Protocol"], summary="Model metadata")
        async def model_metadata(name: str, version: str = VERSION):
            check_version(version)
            return protocol().metadata(name)

        @app.get(prefix + "/ready", tags=["Open Inference Protocol"], summary="Model readiness")
        async def model_ready(name: str, version: str = VERSION):
            check_version(version)
            protocol().check_model(name)
            return {"name": name, "ready": True}

        @app.post(prefix + "/infer", tags=["Open Inference Protocol"], summary="Inference on preprocessed tensors")
        async def infer(request: Request, name: str, version: str = VERSION):
            check_version(version)
            p = protocol()
            if request.headers.get("content-encoding", "identity") != "identity":
                raise UserError("compressed requests are not accepted; send the body uncompressed")
            header = request.headers.get(HEADER)
            if header is not None and not (header.isascii() and header.isdigit()):
                raise UserError(f"Inference-Header-Content-Length must be a byte count, got {header!r}")
            content = await request.body()
            json_bytes = len(content) if header is None else int(header)
            if json_bytes > p.max_json_bytes:
                raise UserError(f"the request's JSON is {json_bytes} bytes, more than the {p.max_json_bytes} this service "
                                "parses; send the tensors in binary (each input's parameters.binary_data_size, the "
                                "JSON's length in the Inference-Header-Content-Length header)", 413)
            x, req = await off_loop(p.parse, name, content, None if header is None else int(header))
            try:
                outputs = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, p.infer, name, x),
                                                 timeout_s)
            except asyncio.TimeoutError:
                raise UserError(f"inference took longer than {timeout_s} s", 504)
            return await off_loop(p.response, name, req, outputs)


MAX_VALUES = 1 << 30        # values of one input tensor (4 GiB of FP32): beyond any request the limits let through
# JSON is parsed and written holding the interpreter: beyond --max-json-mb (2 by default) a request would stall
# /healthz and every other request (19 MB of JSON: /healthz 526 ms at worst; benchmarks/healthz_json.py), so it is
# refused before any work, naming the binary extension, which has no such limit


def parameters(obj: dict, what: str) -> dict:
    """``obj["parameters"]``, which the protocol makes an object; {} when absent."""
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise UserError(f'{what}: "parameters" must be an object, got {p!r}')
    return p


def check_version(version: str) -> None:
    if version != VERSION:
        raise UserError(f"model version {version!r} does not exist; version {VERSION} does", 404)
