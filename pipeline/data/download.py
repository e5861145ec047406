"""Verified, resumable downloads and safe archive extraction."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


class ChecksumError(DownloadError):
    pass


class UnsafeArchiveError(RuntimeError):
    pass


class DiskSpaceError(OSError):
    pass


@dataclass(frozen=True)
class Resource:
    """A file at ``url``, saved as ``filename``, verified by its full md5 or sha256 (never a prefix);
    ``size`` (bytes, where known) lets the free-space check run before the first byte is fetched."""
    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None

    def __post_init__(self):
        if not (self.md5 or self.sha256):
            raise ValueError(f"{self.filename}: a download needs its md5 or sha256 to be verified")
        for algo, n in (("md5", 32), ("sha256", 64)):
            digest = getattr(self, algo)
            if digest and not re.fullmatch(f"[0-9a-f]{{{n}}}", digest):
                raise ValueError(f"{self.filename}: {algo} must be the full digest, {n} lowercase hex digits "
                                 f"(got {digest!r}); a prefix would let a different file through")

    def with_url(self, url: str) -> "Resource":
        return Resource(url, self.filename, self.md5, self.sha256, self.size)

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 else f"md5:{self.md5}"


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def require_space(folder: str | Path, need: int, what: str) -> None:
    """Raise DiskSpaceError naming the shortfall when the disk holding ``folder`` has less than ``need``
    bytes free; before a download or an extraction starts, so nothing is half-written."""
    folder = Path(folder).resolve()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise DiskSpaceError(f"{what} needs {gigabytes(need)} in {folder}, the disk has {gigabytes(free)} free: "
                             f"free {gigabytes(need - free)} more (or set data.keep_archives: false to drop each "
                             "archive once extracted) and run again; everything verified so far is kept")


def mirrored(res: Resource, mirror: str) -> Resource:
    """The same file fetched from ``mirror`` (a base URL serving it under its file name)."""
    return res.with_url(mirror.rstrip("/") + "/" + res.filename) if mirror else res


def link_or_copy(src: str | Path, dst: str | Path) -> Path:
    """Hard-link ``src`` to ``dst`` (replacing it), copying where links are not possible."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check(res: Resource, path: Path) -> tuple[bool, str, str]:
    if res.sha256:
        actual = file_digest(path, "sha256")
        return actual == res.sha256, res.sha256, actual
    actual = file_digest(path, "md5")
    return actual == res.md5, res.md5, actual


def download(res: Resource, dest_dir: str | Path, timeout: float = 60.0, progress: bool = True,
             then_extract: bool = False) -> Path:
    """Fetch ``res`` into ``dest_dir``, resuming a partial ``.part`` file with an HTTP Range request.

    A file already present and verified is not fetched again; one present that fails its checksum is moved
    aside (``<name>.mismatch-<digest>``), never deleted. On a checksum mismatch of the downloaded file, the
    file is removed and ``ChecksumError`` names the URL and both digests. The disk must hold what is left to
    fetch (and, ``then_extract``, as much again for the extracted files) before the first byte is written.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / res.filename
    if final.exists():
        ok, _, _ = _check(res, final)
        if ok:
            log.info("%s already present and verified", final)
            return final
        aside = final.with_name(f"{final.name}.mismatch-{_check(res, final)[2][:12]}")
        os.replace(final, aside)            # never deleted: it may be the only copy of something
        log.warning("%s fails its checksum (expected %s): moved aside to %s, downloading again", final, res.digest,
                    aside)
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "svf-fss"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(res.url, headers=headers), timeout=timeout) as r:
            if offset and r.status != 206:
                log.warning("%s ignored the resume request; starting over", res.url)
                offset = 0
            length = r.headers.get("Content-Length")
            total = int(length) + offset if length is not None else None
            left = int(length) if length is not None else (res.size - offset if res.size else 0)
            require_space(dest_dir, left + ((total or res.size or 0) if then_extract else 0),
                          f"{res.filename}" + (" and its extraction" if then_extract else ""))
            with open(part, "ab" if offset else "wb") as f, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=res.filename,
                    disable=not progress, mininterval=1.0) as bar:
                while True:
                    block = r.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:   # the partial file is already complete
            pass
        else:
            raise DownloadError(f"download of {res.url} failed: HTTP {e.code} {e.reason}") from e
    except DiskSpaceError:
        raise
    except (urllib.error.URLError, OSError) as e:
        if getattr(e, "errno", None) == errno.ENOSPC:
            raise DiskSpaceError(f"the disk filled up while fetching {res.url}: {part} keeps "
                                 f"{part.stat().st_size if part.exists() else 0} bytes; free space and run again "
                                 "to resume") from e
        raise DownloadError(f"download of {res.url} interrupted ({e}); {part} keeps "
                            f"{part.stat().st_size if part.exists() else 0} bytes and the next run resumes") from e
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"download of {res.url} ended early at {part.stat().st_size} of {total} bytes; "
                            "run again to resume")
    ok, expected, actual = _check(res, part)
    if not ok:
        part.unlink()
        raise ChecksumError(f"checksum mismatch for {res.url}: expected {expected}, got {actual}; "
                            "the file was removed")
    os.replace(part, final)
    return final


def _safe_member_path(target: Path, name: str) -> Path:
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path; refusing to extract")
    dest = (target / p).resolve()
    if dest != target and target not in dest.parents:
        raise UnsafeArchiveError(f"archive member {name!r} would land outside {target}; refusing to extract")
    return dest


def _inside(path: PurePosixPath, links: dict[str, str], depth: int = 0) -> PurePosixPath | None:
    """``path`` (relative to the archive's root) with every component resolved through the archive's
    own symbolic links, as the extracted tree would resolve it; None when it climbs above the root."""
    parts: list[str] = []
    for comp in path.parts:
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(comp)
        link = links.get("/".join(parts))
        if link is not None:
            if depth > 40:
                raise UnsafeArchiveError(f"archive links around {'/'.join(parts)!r} form a loop; refusing")
            if PurePosixPath(link).is_absolute():
                return None
            resolved = _inside(PurePosixPath(*parts[:-1], link), links, depth + 1)
            if resolved is None:
                return None
            parts = list(resolved.parts)
    return PurePosixPath(*parts)


def _check_tar(tf: tarfile.TarFile, target: Path) -> None:
    """Every member, every link and every path written through a link stays inside ``target``,
    links resolved through the archive's other links (a chain of individually harmless links can
    climb out once extracted). Checked here, not left to the standard library's extraction filter,
    which older Pythons lack."""
    members = tf.getmembers()
    links = {str(PurePosixPath(m.name)).strip("/"): m.linkname for m in members if m.issym()}
    for m in members:
        _safe_member_path(target, m.name)
        name = PurePosixPath(m.name)
        if _inside(name.parent, links) is None:
            raise UnsafeArchiveError(f"archive member {m.name!r} would be written through a link outside {target}; "
                                     "refusing")
        if m.issym() or m.islnk():
            if PurePosixPath(m.linkname).is_absolute():
                raise UnsafeArchiveError(f"archive link {m.name!r} -> {m.linkname!r} is absolute; refusing")
            link = name.parent / m.linkname if m.issym() else PurePosixPath(m.linkname)
            if _inside(link, links) is None:
                raise UnsafeArchiveError(f"archive link {m.name!r} -> {m.linkname!r} escapes {target}; refusing")
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"archive member {m.name!r} is a device or fifo; refusing")


def extract(archive: str | Path, target: str | Path, marker: str | None = None) -> Path:
    """Extract a .tar/.tgz/.zip into ``target`` after checking every member; nothing lands outside.

    Extraction goes to a temporary sibling directory, whose content is then moved into ``target``,
    so an interrupted extraction leaves no half-written tree. ``marker`` (a relative path expected
    after extraction) makes a repeated call a no-op.
    """
    archive, target = Path(archive), Path(target).resolve()
    if marker and (target / marker).exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _safe_member_path(target, info.filename)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise UnsafeArchiveError(f"archive member {info.filename!r} is a symbolic link; refusing")
                require_space(tmp, sum(i.file_size for i in zf.infolist()), f"extracting {archive.name}")
                for info in tqdm(zf.infolist(), desc=f"extract {archive.name}", unit="file", mininterval=1.0):
                    zf.extract(info, tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                _check_tar(tf, target)
                require_space(tmp, sum(m.size for m in tf.getmembers()), f"extracting {archive.name}")
                # every member was checked above; the stdlib "data" filter (where present) checks again
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                for m in tqdm(tf.getmembers(), desc=f"extract {archive.name}", unit="file", mininterval=1.0):
                    tf.extract(m, tmp, **kw)
        else:
            raise UnsafeArchiveError(f"{archive} is neither a tar nor a zip archive")
        for child in tmp.iterdir():
            dest = target / child.name
            if dest.exists():
                if dest.is_dir():
                    shutil.rmtree(dest)
                else:
                    dest.unlink()
            os.replace(child, dest)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskSpaceError(f"the disk filled up while extracting {archive}: nothing of it was kept, the archive "
                                 "is; free space and run again") from e
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise DownloadError(f"{archive} is damaged ({e}); nothing of it was extracted: delete it and run again "
                            "to fetch it anew") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
