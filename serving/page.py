"""The page (serving/ui.html) as the service serves it, with a Content Security Policy under which only the
page's own script runs: script-src names it by its sha256, no inline script ('unsafe-inline') otherwise.

The page's one executable ``<script>`` is constant; the limits it reads (JSON) are put in a
``<script type="application/json" id="limits">`` data block, which is never run and so is not the
policy's business. Any change to the script's text changes its hash, which is computed from the file.
"""
from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

PAGE = Path(__file__).with_name("ui.html")
SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)     # executable: a bare <script>; data blocks have a type
POLICY = ("default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
          "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=1)
def _template() -> tuple[str, str]:
    """(the page's text, its CSP): every executable script of the page allowed by its sha256."""
    html = PAGE.read_text()
    scripts = SCRIPT.findall(html)
    if not scripts or "<script " in html.replace('<script type="application/json"', ""):
        raise ValueError(f"{PAGE}: the page's scripts must be bare <script> elements (hashed) or JSON data blocks")
    if any("__LIMITS__" in s for s in scripts):
        raise ValueError(f"{PAGE}: __LIMITS__ stands in a script; it belongs in the limits data block")
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return html, POLICY.format(scripts=hashes)


def page_and_csp(limits_js: str) -> tuple[str, str]:
    """(the page with ``limits_js``, a JSON object, in its limits element; the Content-Security-Policy header
    to serve it with). Every '<' of the JSON is written \\u003c, so that the data cannot end its element."""
    html, csp = _template()
    return html.replace("__LIMITS__", limits_js.replace("<", "\\u003c")), csp
