"""The one Label Studio this backend talks to, and how it authenticates there.

Label Studio 1.23 creates organisations with legacy API tokens disabled: its API then takes only
``Authorization: Bearer <access token>``, where the access token (a JWT living 5 minutes) comes from
``POST /api/token/refresh/ {"refresh": <personal access token>}``. A personal access token (a JWT) is
exchanged so, the access token kept until a minute before it expires and exchanged again after a 401; a
legacy token (40 hex characters) is sent as ``Token <key>`` as before. The URL is the operator's
(``--ls-url``) or the first one a ``/setup`` that passed its checks named (then pinned): the token goes to
that origin and nowhere else (images.py decides what else may be read).
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.parse

from ..inputs import UserError

log = logging.getLogger("serving.labelstudio")


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


def jwt_claims(token: str) -> dict | None:
    """The payload of a JWT-shaped token (not verified: only to tell a personal access token from a legacy one
    and to read when an access token expires), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudio:
    def __init__(self, url: str | None, token: str | None, deadline: float = 20.0):
        if token and not url:
            raise ValueError("a Label Studio token is given without its URL: give --ls-url (or LABEL_STUDIO_URL) "
                             "so that the token only ever goes to that Label Studio")
        if url and not origin(url):
            raise ValueError(f"--ls-url {url!r} is not an http(s) URL")
        self.url = url.rstrip("/") if url else None
        self.pinned = bool(url)                    # by the operator: /setup cannot change it
        self.token, self.token_fixed = token, bool(token)     # the operator's token wins over /setup's
        self.access: tuple[str, float] | None = None         # (access token, when to exchange again)
        self.lock = threading.Lock()               # the URL and token (taken on the event loop: never across I/O)
        self.exchanging = threading.Lock()         # one token exchange at a time
        import httpx
        self.http = httpx.Client(timeout=min(10.0, deadline), follow_redirects=False)

    def setup(self, hostname: str | None, token: str | None) -> None:
        """What a /setup that passed its checks says: Label Studio's URL and token (see the module's rules)."""
        with self.lock:
            if hostname and not self.pinned:
                if not origin(hostname):
                    raise UserError(f"/setup's hostname {hostname[:100]!r} is not an http(s) URL")
                if self.url and origin(self.url) != origin(hostname):
                    raise UserError(f"this backend reads images from the Label Studio at {self.url}; /setup names "
                                    f"another ({hostname[:100]}): restart it with --ls-url to change", 403)
                self.url = hostname.rstrip("/")
            elif hostname and origin(hostname) != origin(self.url or ""):
                log.info("/setup names %s; this backend talks to --ls-url %s", hostname[:100], self.url)
            # a token counts only with the host it came from, and only when that host is the one in use
            if token and not self.token_fixed and token != self.token and hostname and self.url \
                    and origin(hostname) == origin(self.url):
                self.token, self.access = token, None

    def owns(self, url: str) -> bool:
        return bool(self.url) and origin(url) == origin(self.url)

    @property
    def personal(self) -> bool:
        """Whether the token is a personal access token (a JWT) rather than a legacy key."""
        return bool(self.token) and jwt_claims(self.token) is not None

    def _exchange(self, url: str, token: str) -> tuple[str, float]:
        r = self.http.post(url + "/api/token/refresh/", json={"refresh": token})
        try:
            access = r.json()["access"] if r.status_code == 200 else None
            expires = float((jwt_claims(access) or {}).get("exp", time.time() + 300)) if isinstance(access, str) else 0
        except (ValueError, TypeError, KeyError):
            access = None
        if not isinstance(access, str):
            raise UserError(f"Label Studio refused the personal access token (HTTP {r.status_code}: "
                            f"{r.text[:200]}): create a new one (Account & Settings > Personal Access Token)", 401)
        return access, expires - 60

    def headers(self, fresh: bool = False) -> dict:
        if not self.token:
            return {}
        if not self.personal:
            return {"Authorization": f"Token {self.token}"}
        with self.exchanging:
            if fresh or self.access is None or time.time() > self.access[1]:
                self.access = self._exchange(self.url, self.token)
            return {"Authorization": f"Bearer {self.access[0]}"}

    def request(self, method: str, path_or_url: str, **kw):
        """An authenticated request to Label Studio (a path, or a URL on its origin); after a 401 the access token
        is exchanged again and the request sent once more. Streams when ``stream=True`` (a context manager)."""
        if not self.url:
            raise UserError("no Label Studio URL is known (--ls-url, or connect the backend so that /setup names it)")
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else self.url + path_or_url
        if not self.owns(url):
            raise UserError(f"{url[:200]} is not on the configured Label Studio's origin")
        r = self.http.request(method, url, headers=self.headers(), **kw)
        if r.status_code == 401 and self.personal:
            r = self.http.request(method, url, headers=self.headers(fresh=True), **kw)
        return r

    def stream(self, url: str):
        """An authenticated streaming GET on Label Studio's origin (the caller closes it), retried after a 401."""
        req = self.http.build_request("GET", url, headers=self.headers())
        r = self.http.send(req, stream=True)
        if r.status_code == 401 and self.personal:
            r.close()
            r = self.http.send(self.http.build_request("GET", url, headers=self.headers(fresh=True)), stream=True)
        return r

    def pages(self, path: str, key: str, params: dict, most: int = 10_000):
        """Every item of a paginated list (``/api/tasks``: {"tasks": [...], "total": n}), page by page, until the
        total is reached or a page comes back empty; any other answer raises (a partial list is never taken
        for the whole)."""
        page, got = 1, 0
        while page <= most:
            r = self.request("GET", path, params={**params, "page": page, "page_size": 100})
            if r.status_code != 200:
                raise UserError(f"Label Studio answered {path} with HTTP {r.status_code}: {r.text[:200]}",
                                401 if r.status_code == 401 else 502)
            body = r.json()
            items = body.get(key) or [] if isinstance(body, dict) else []
            yield from items
            got += len(items)
            total = body.get("total") if isinstance(body, dict) else None
            if not items or (isinstance(total, int) and got >= total):
                return
            page += 1
        raise UserError(f"{path} has more than {most} pages", 502)
