"""The documentation site (mkdocs.yml, docs/) and the README that points to it.

One `mkdocs build --strict` for the whole module (about a second): broken links, anchors and images,
and pages left out of the nav, fail it. The built pages must load nothing from the network (no CDN
script, no web font), every page of the nav must be built, the README must stay short, and each
marked command block that other tests execute must stand exactly once in README.md + docs/."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("experiments", "compare", "ablation", "own-data", "onnx-example")   # run by test_pipeline / test_serving


def mkdocs_command() -> list[str]:
    exe = Path(sys.executable).with_name("mkdocs")       # the environment's own console script
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mkdocs"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run(mkdocs_command() + ["build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                                           "--site-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    return out


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return [p for item in nav for p in nav_pages(item)]


def config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "search" / "search_index.js").is_file(), "the offline plugin's inlined search index is missing"


def test_no_external_assets(site):
    pages = sorted(site.rglob("*.html"))
    assert pages
    external = r"""(?:https?:)?//"""
    for page in pages:
        html = page.read_text(encoding="utf-8")
        name = page.relative_to(site)
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html, f"{name}: Google Fonts"
        scripts = re.findall(rf"""<script\b[^>]*\bsrc\s*=\s*["']?{external}[^"'\s>]*""", html, re.I)
        assert not scripts, f"{name}: external script {scripts}"
        for tag in re.findall(r"<link\b[^>]*>", html, re.I):
            rel = re.search(r"""\brel\s*=\s*["']?([^"'>]*)""", tag, re.I)
            rels = set(rel.group(1).lower().split()) if rel else set()
            if rels & {"stylesheet", "preload", "preconnect", "dns-prefetch", "modulepreload", "prefetch"} or \
                    re.search(r"""\bas\s*=\s*["']?font""", tag, re.I):
                assert not re.search(rf"""\bhref\s*=\s*["']?{external}""", tag, re.I), f"{name}: external {tag}"
        assert 'class="mermaid"' not in html, f"{name}: a mermaid diagram makes the theme load mermaid from a CDN"
    for css in site.rglob("*.css"):
        text = css.read_text(encoding="utf-8")
        assert not re.search(rf"""url\(\s*["']?{external}|@import\s+["']?{external}""", text), \
            f"{css.relative_to(site)}: external url()"
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text


def test_theme_settings_keep_the_site_offline():
    cfg = config()
    assert cfg["theme"]["name"] == "material" and cfg["theme"]["font"] is False
    assert "offline" in cfg["plugins"] and "search" in cfg["plugins"]
    # the offline plugin would add https://unpkg.com/iframe-worker/shim unless a local iframe-worker is listed
    polyfills = cfg.get("extra", {}).get("polyfills", [])
    assert polyfills and all("iframe-worker" in p and not re.match(r"(https?:)?//", p) for p in polyfills)
    assert all((ROOT / cfg.get("docs_dir", "docs") / p).is_file() for p in polyfills)
    assert "repo_url" not in cfg, "repo_url makes the theme fetch repository facts from the network"


def test_every_nav_page_is_built(site):
    pages = nav_pages(config()["nav"])
    assert "index.md" in pages and len(pages) == len(set(pages))
    for md in pages:
        assert (ROOT / "docs" / md).is_file(), f"nav names {md}, which docs/ lacks"
        # the offline plugin turns directory URLs off: docs/x.md -> x.html
        assert (site / Path(md).with_suffix(".html")).is_file(), f"{md} was not built"


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the details belong in docs/"
    assert lines[0] == "# svf-fss"
    block = lines[lines.index("```") + 1:]
    block = block[:block.index("```")]
    assert [line.split()[:2] for line in block] == [["make", "repro"], ["make", "test"]]


@pytest.mark.parametrize("marker", MARKERS)
def test_marker_stands_once_before_its_code_block(marker):
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    tag = f"<!-- {marker} -->"
    hits = [(p, text) for p in pages for text in [p.read_text(encoding="utf-8")] if tag in text]
    assert len(hits) == 1 and hits[0][1].count(tag) == 1, \
        f"{tag} must stand once in README.md + docs/, found in {[str(p.relative_to(ROOT)) for p, _ in hits]}"
    after = hits[0][1].split(tag, 1)[1]
    assert after.lstrip("\n").startswith("```"), f"{tag} must be followed directly by its code block"
