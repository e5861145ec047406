"""Where the backend may read a task's image from.

* Label Studio's own paths (``/data/upload/...``, ``/data/local-files/...``) and URLs on its origin are read
  from the one Label Studio of client.py, with its token; cloud-storage URIs (``s3://``, ``gs://``,
  ``azure-blob://``) through its presign endpoint (``/tasks/<task>/presign/?fileuri=<base64url>``, as
  label-studio-sdk resolves them), following its redirect to the signed URL without the token.
* Other http(s) URLs only from the hosts the operator allows (``--allow-image-host``), without a token.
* Redirects are followed (at most 3) only while they stay on those origins (or leave Label Studio's own);
  each read must finish within ``deadline`` seconds and ``max_bytes``; the body is collected in one
  growing buffer.
* A caller is told only that the image could not be read (the log says why): the backend is no oracle for
  what answers on the operator's network.
"""
from __future__ import annotations

import base64
import logging
import re
import time
import urllib.parse

import httpx
import numpy as np

from ..inputs import UserError, read_image
from .client import LabelStudio, origin

log = logging.getLogger("serving.labelstudio")
UNREADABLE = "the task's image could not be read (the backend's log says why)"
CLOUD = ("s3", "gs", "azure-blob")
PRESIGN = re.compile(r"/tasks/\d+/(presign|resolve)/")


class ImageSource:
    def __init__(self, ls: LabelStudio, allow_hosts=(), max_bytes: int = 50 << 20, max_pixels: int = 4096 * 4096,
                 deadline: float = 20.0):
        self.ls = ls
        self.allowed = {h.lower() for h in allow_hosts}
        self.max_bytes, self.max_pixels, self.deadline = max_bytes, max_pixels, deadline
        self.http = ls.http

    def _allowed(self, url: str) -> bool:
        o = origin(url)
        if o is None:
            return False
        host = urllib.parse.urlsplit(url).hostname or ""
        return self.ls.owns(url) or host.lower() in self.allowed or o.split("://", 1)[1] in self.allowed

    def read(self, url, what: str, task: int | None = None) -> np.ndarray:
        """The task's image as RGB uint8; every refusal is the one generic UserError, the reason logged."""
        try:
            return read_image(self._get(url, task), what, self.max_pixels)
        except UserError as e:
            log.warning("%s: %s", what, e)
            raise UserError(UNREADABLE) from e

    def _get(self, url, task: int | None) -> bytes:
        if not isinstance(url, str) or not url:
            raise UserError("the task has no image URL")
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in CLOUD:
            if task is None or not self.ls.url:
                raise UserError(f"{url[:200]} is a cloud-storage URI: it is read through Label Studio's presign "
                                "endpoint, which needs the task's id and Label Studio's URL")
            uri = base64.urlsafe_b64encode(url.encode()).decode()
            url = f"{self.ls.url}/tasks/{int(task)}/presign/?fileuri={uri}"
        elif url.startswith("/") and not url.startswith("//"):
            if not self.ls.url:
                raise UserError(f"{url[:200]} is a Label Studio path and no Label Studio URL is known (--ls-url, or "
                                "connect the backend so that /setup names it)")
            url = self.ls.url + url
        elif scheme not in ("http", "https"):
            raise UserError(f"{url[:200]!r} is neither an http(s) URL, a cloud-storage URI nor a Label Studio path")
        stop, from_presign = time.monotonic() + self.deadline, False
        for _ in range(4):
            if not (self._allowed(url) or (from_presign and origin(url))):
                raise UserError(f"{url[:200]}: not the configured Label Studio nor a host allowed by --allow-image-host")
            own = self.ls.owns(url)
            path = urllib.parse.urlsplit(url).path
            if own and not (path.startswith("/data/") or PRESIGN.fullmatch(path)):
                raise UserError(f"{url[:200]}: a Label Studio path outside /data/ and the presign endpoint")
            try:
                r = self.ls.stream(url) if own else self.http.send(self.http.build_request("GET", url), stream=True)
                try:
                    if r.is_redirect and "location" in r.headers:
                        # only the presign endpoint may send the read elsewhere (to the signed URL), never the token
                        from_presign = own and bool(PRESIGN.fullmatch(path))
                        url = urllib.parse.urljoin(url, r.headers["location"])
                        continue
                    if r.status_code != 200:
                        raise UserError(f"{url[:200]}: HTTP {r.status_code}")
                    return self._body(r, url, stop)
                finally:
                    r.close()
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
                raise UserError(f"{url[:200]}: {type(e).__name__} {e}") from e
        raise UserError(f"{url[:200]}: more than 3 redirects")

    def _body(self, r, url: str, stop: float) -> bytes:
        data = bytearray()
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) > self.max_bytes:
                raise UserError(f"{url[:200]} is over {self.max_bytes >> 20} MB")
            if time.monotonic() > stop:
                raise UserError(f"{url[:200]} took more than {self.deadline:g} s")
        return bytes(data)
