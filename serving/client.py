"""Python client and command line for the svf-fss service.

    python -m serving.client segment --query q.jpg --support s1.jpg --mask m1.png [--support ... --mask ...] --out mask.png
    python -m serving.client register NAME --support s1.jpg --mask m1.png
    python -m serving.client segment --set NAME --query q.jpg --json
    python -m serving.client segment --set NAME --query q.jpg --overlay --out overlay.png
    python -m serving.client health
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx


class ServiceError(RuntimeError):
    pass


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0, api_key: str | None = None):
        api_key = api_key or os.environ.get("SVF_FSS_API_KEY")
        self.http = httpx.Client(base_url=url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else None)

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text
            raise ServiceError(f"HTTP {r.status_code}: {msg}")
        return r

    @staticmethod
    def _files(query=None, supports=(), masks=()):
        files = []
        if query is not None:
            files.append(("query", (Path(query).name, Path(query).read_bytes())))
        files += [("supports", (Path(p).name, Path(p).read_bytes())) for p in supports]
        files += [("masks", (Path(p).name, Path(p).read_bytes())) for p in masks]
        return files

    @staticmethod
    def _form(fmt: str | None = None, mask_threshold: float | None = None) -> dict:
        return {k: str(v) for k, v in (("format", fmt), ("mask_threshold", mask_threshold)) if v is not None}

    def segment(self, query, supports, masks, fmt: str = "png", mask_threshold: float | None = None):
        """PNG bytes (format png: 0 background / 255 object at the query's resolution; overlay: the query
        with the mask drawn) or the JSON answer."""
        r = self._check(self.http.post("/v1/segment", files=self._files(query, supports, masks),
                                       data=self._form(fmt, mask_threshold)))
        return r.json() if fmt == "json" else r.content

    def register(self, name: str, supports, masks, mask_threshold: float | None = None) -> dict:
        return self._check(self.http.put(f"/v1/support-sets/{name}", files=self._files(None, supports, masks),
                                         data=self._form(None, mask_threshold))).json()

    def segment_with(self, name: str, query, fmt: str = "png"):
        r = self._check(self.http.post(f"/v1/support-sets/{name}/segment", files=self._files(query),
                                       data=self._form(fmt)))
        return r.json() if fmt == "json" else r.content

    def label_map(self, query, sets=(), classes: dict | None = None, fmt: str = "png",
                  background_threshold: float | None = None, mask_threshold: float | None = None):
        """One query against several classes: ``sets`` names registered support sets, ``classes`` maps a class
        name to its (supports, masks) inline. The label map as a palette PNG (value = class id, 1 = the first
        set, then the inline classes in order; 0 background), an overlay PNG, or the JSON answer."""
        files, names = self._files(query), []
        for name, (supports, masks) in (classes or {}).items():
            files += self._files(None, supports, masks)
            names += [name] * len(supports)
        data = {"sets": list(sets), "classes": names, **self._form(fmt, mask_threshold)}
        if background_threshold is not None:
            data["background_threshold"] = str(background_threshold)
        r = self._check(self.http.post("/v1/label-map", files=files, data=data))
        return r.json() if fmt == "json" else r.content

    def ready(self) -> dict:
        return self._check(self.http.get("/readyz")).json()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m serving.client", description="svf-fss client")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None, help="the service's API key (default: SVF_FSS_API_KEY)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    seg = sub.add_parser("segment", help="segment a query")
    seg.add_argument("--query", required=True)
    seg.add_argument("--support", action="append", default=[])
    seg.add_argument("--mask", action="append", default=[])
    seg.add_argument("--set", help="a registered support set instead of --support/--mask")
    seg.add_argument("--json", action="store_true", help="print JSON (COCO RLE, area) instead of writing a PNG")
    seg.add_argument("--overlay", action="store_true", help="write the query with the mask drawn instead of the mask")
    seg.add_argument("--mask-threshold", type=float, default=None,
                     help="binarise JPEG or anti-aliased masks at this fraction of white (0 < t < 1)")
    seg.add_argument("--out", default="mask.png")
    reg = sub.add_parser("register", help="register a named support set")
    reg.add_argument("name")
    reg.add_argument("--support", action="append", required=True)
    reg.add_argument("--mask", action="append", required=True)
    reg.add_argument("--mask-threshold", type=float, default=None)
    sub.add_parser("health", help="readiness of the service")
    args = ap.parse_args(argv)
    c = Client(args.url, api_key=args.api_key)
    try:
        if args.cmd == "health":
            print(json.dumps(c.ready()))
        elif args.cmd == "register":
            print(json.dumps(c.register(args.name, args.support, args.mask, args.mask_threshold)))
        else:
            fmt = "json" if args.json else "overlay" if args.overlay else "png"
            out = c.segment_with(args.set, args.query, fmt) if args.set else c.segment(args.query, args.support,
                                                                                       args.mask, fmt,
                                                                                       args.mask_threshold)
            if fmt == "json":
                print(json.dumps(out))
            else:
                Path(args.out).write_bytes(out)
                print(f"{'overlay' if fmt == 'overlay' else 'mask'} written to {args.out}")
    except httpx.ConnectError as e:
        sys.exit(f"error: no service answers at {args.url} ({e}); start one with `make serve` "
                 "(or `python -m serving --model-dir models/fold0/1shot`), or point --url at it")
    except (ServiceError, httpx.HTTPError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
