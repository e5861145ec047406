"""Where the backend may read a task's image from, and with which credentials.

* Label Studio's own paths (``/data/upload/...``, ``/data/local-files/...``, or absolute URLs on its
  origin) are read from the one Label Studio the operator configured (``--ls-url``), or, without it, from
  the first host a ``/setup`` that passed every check named: that host is then pinned and a ``/setup``
  naming another is refused. Its token goes there and nowhere else.
* Other http(s) URLs only from the hosts the operator allows (``--allow-image-host``), without a token.
* Redirects are followed (at most 3) only while they stay on those origins; each read must finish within
  ``deadline`` seconds and ``max_bytes``; the body is collected in one growing buffer.
* A caller is told only that the image could not be read (the log says why): the backend is no oracle for
  what answers on the operator's network.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse

import numpy as np

from ..inputs import UserError, read_image

log = logging.getLogger("serving.labelstudio")
UNREADABLE = "the task's image could not be read (the backend's log says why)"


def origin(url: str) -> str | None:
    """scheme://host:port of an http(s) URL (default ports made explicit), else None."""
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host.lower()}:{port}"


class ImageSource:
    def __init__(self, ls_url: str | None, ls_token: str | None, allow_hosts=(), max_bytes: int = 50 << 20,
                 max_pixels: int = 4096 * 4096, deadline: float = 20.0):
        if ls_token and not ls_url:
            raise ValueError("a Label Studio token is given without its URL: give --ls-url (or LABEL_STUDIO_URL) "
                             "so that the token only ever goes to that Label Studio")
        if ls_url and not origin(ls_url):
            raise ValueError(f"--ls-url {ls_url!r} is not an http(s) URL")
        self.ls_url = ls_url.rstrip("/") if ls_url else None
        self.pinned = bool(ls_url)                 # by the operator: /setup cannot change it
        self.token, self.token_fixed = ls_token, bool(ls_token)     # the operator's token wins over /setup's
        self.allowed = {h.lower() for h in allow_hosts}
        self.max_bytes, self.max_pixels, self.deadline = max_bytes, max_pixels, deadline
        self.lock = threading.Lock()
        import httpx
        self.http = httpx.Client(timeout=min(10.0, deadline), follow_redirects=False)

    def setup(self, hostname: str | None, token: str | None) -> None:
        """What a /setup that passed its checks says: Label Studio's URL and token (see the module's rules)."""
        with self.lock:
            if hostname and not self.pinned:
                if not origin(hostname):
                    raise UserError(f"/setup's hostname {hostname[:100]!r} is not an http(s) URL")
                if self.ls_url and origin(self.ls_url) != origin(hostname):
                    raise UserError(f"this backend reads images from the Label Studio at {self.ls_url}; /setup names "
                                    f"another ({hostname[:100]}): restart it with --ls-url to change", 403)
                self.ls_url = hostname.rstrip("/")
            elif hostname and origin(hostname) != origin(self.ls_url or ""):
                log.info("/setup names %s; images are read from --ls-url %s", hostname[:100], self.ls_url)
            if token and not self.token_fixed:
                self.token = token

    def _allowed(self, url: str) -> tuple[bool, bool]:
        """(may be read, with Label Studio's token)."""
        o = origin(url)
        if o is None:
            return False, False
        if self.ls_url and o == origin(self.ls_url):
            return True, True
        host = urllib.parse.urlsplit(url).hostname or ""
        return host.lower() in self.allowed or o.split("://", 1)[1] in self.allowed, False

    def read(self, url, what: str) -> np.ndarray:
        """The task's image as RGB uint8; every refusal is the one generic UserError, the reason logged."""
        try:
            return read_image(self._get(url), what, self.max_pixels)
        except UserError as e:
            log.warning("%s: %s", what, e)
            raise UserError(UNREADABLE) from e

    def _get(self, url) -> bytes:
        import httpx
        if not isinstance(url, str) or not url:
            raise UserError("the task has no image URL")
        if url.startswith("/") and not url.startswith("//"):
            if not self.ls_url:
                raise UserError(f"{url[:200]} is a Label Studio path and no Label Studio URL is known (--ls-url, or "
                                "connect the backend so that /setup names it)")
            url = self.ls_url + url
        elif not url.startswith(("http://", "https://")):
            raise UserError(f"{url[:200]!r} is neither an http(s) URL nor a Label Studio path")
        stop = time.monotonic() + self.deadline
        for _ in range(4):
            ok, with_token = self._allowed(url)
            if not ok:
                raise UserError(f"{url[:200]}: not the configured Label Studio nor a host allowed by --allow-image-host")
            headers = {"Authorization": f"Token {self.token}"} if with_token and self.token else {}
            try:
                with self.http.stream("GET", url, headers=headers) as r:
                    if r.is_redirect and "location" in r.headers:
                        url = urllib.parse.urljoin(url, r.headers["location"])
                        continue
                    if r.status_code != 200:
                        raise UserError(f"{url[:200]}: HTTP {r.status_code}")
                    data = bytearray()
                    for chunk in r.iter_bytes():
                        data += chunk
                        if len(data) > self.max_bytes:
                            raise UserError(f"{url[:200]} is over {self.max_bytes >> 20} MB")
                        if time.monotonic() > stop:
                            raise UserError(f"{url[:200]} took more than {self.deadline:g} s")
                    return bytes(data)
            except httpx.HTTPError as e:
                raise UserError(f"{url[:200]}: {type(e).__name__} {e}") from e
        raise UserError(f"{url[:200]}: more than 3 redirects")
