"""Registered support sets that survive a restart: one file per set, per-key quotas, the model's fingerprint.

Layout: ``<root>/<owner>/<name>.npz`` (owner: the API key's id, ``_open`` without keys) holding the
encoded features and a JSON ``meta`` (shots, the masks' sizes and object areas, the model's
fingerprint, when). Written to a temporary file and renamed, so a crash leaves the old set or the new
one, never half of one. At start every set is reloaded; a set encoded by another model (another
fingerprint: other weights, or another backend whose features differ in form) is refused with a
warning and left on disk, never used: its images are not kept, so it cannot be re-encoded. So is a set
whose features are not what this model's encoder makes (their count, float32, the shapes, finite
values), and a leftover temporary file (``.<name>.*.tmp.npz``, a write a crash cut short) is never
loaded as a set: it is named at every start and left for its owner to delete. Writes of one store are
serialised: concurrent PUTs of a name leave the last one, on disk as in memory. Another process that serves
the same folder (the MLflow pyfunc) reads a set's file when a request names it (``current``), so that it
sees what the service registered, replaced or deleted since.
"""
from __future__ import annotations

import hashlib
import json
import logging
import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class QuotaError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def fingerprint(kind: str, files: list[Path]) -> str:
    """sha256 over the backend kind and the model files it loaded."""
    h = hashlib.sha256(kind.encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def feature_shapes(backend) -> list | None:
    """[(name, shape with -1 for a free axis)] of the backend's support features, from encoding a blank support;
    None when the backend does not name them (the store then checks dtype and finiteness only)."""
    if not backend.features:
        return None
    k, s = backend.shots or 1, backend.size
    feats = backend.encode(np.zeros((1, k, 3, s, s), np.float32), np.ones((1, k, s, s), np.float32))
    return [(n, [-1 if i in axes else d for i, d in enumerate(f.shape)])
            for (n, axes), f in zip(backend.features.items(), feats)]


class SupportStore:
    def __init__(self, root: str | Path | None, model_fingerprint: str, max_sets: int = 100,
                 max_bytes: int = 256 << 20, feature_shapes: list | None = None):
        self.root = Path(root) if root else None
        self.fp, self.max_sets, self.max_bytes = model_fingerprint, max_sets, max_bytes
        self.shapes = feature_shapes          # [(name, shape with -1 for a free axis)] of the encoder's output
        self.sets: dict[tuple[str, str], tuple] = {}
        self.seen: dict[tuple[str, str], tuple] = {}   # current(): (the file's stamp, its features or None)
        self.lock = threading.Lock()
        self.count = itertools.count()

    def _check(self, feats: tuple) -> str | None:
        """Why ``feats`` cannot be this model's support features, or None."""
        for i, a in enumerate(feats):
            if a.dtype != np.float32 or not np.isfinite(a).all():
                return f"array {i} is {a.dtype}" + (", not float32" if a.dtype != np.float32 else " with non-finite values")
        if self.shapes is None:         # a whole-network backend: the set holds its support tensors
            return None
        if len(feats) != len(self.shapes):
            return f"{len(feats)} feature arrays, this model's encoder makes {len(self.shapes)}"
        for a, (name, shape) in zip(feats, self.shapes):
            if a.ndim != len(shape) or any(w not in (-1, d) for w, d in zip(shape, a.shape)):
                return f"{name} has shape {list(a.shape)}, this model's is {shape} (-1: any)"
        return None

    @staticmethod
    def _dir(owner: str) -> str:
        return owner or "_open"

    def _path(self, owner: str, name: str) -> Path:
        return self.root / self._dir(owner) / f"{name}.npz"

    def _read(self, f: Path) -> tuple | None:
        """The features stored in ``f`` when they are this model's, else None with a warning saying why."""
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                feats = tuple(z[f"f{i}"] for i in range(meta["features"]))
        except Exception as e:     # unreadable: say so, keep serving the rest
            log.warning("support set %s is unreadable (%s); skipped", f, e)
            return None
        if meta.get("model") != self.fp:
            log.warning("support set %s was encoded by another model (fingerprint %s, this one %s); not used, "
                        "register it again", f, str(meta.get("model"))[:12], self.fp[:12])
            return None
        why = self._check(feats)
        if why:
            log.warning("support set %s does not hold this model's features (%s); not used, register it again", f, why)
            return None
        return feats

    def load(self) -> tuple[int, list[str]]:
        """Reload every stored set of this model; returns (loaded, refused files)."""
        refused = []
        if self.root is None or not self.root.is_dir():
            return 0, refused
        for f in sorted(self.root.glob("*/*.npz")):
            if f.name.startswith("."):
                log.warning("%s is a temporary file a write left behind (a crash, or a kill mid-write); not a support "
                            "set, not loaded: delete it", f)
                refused.append(str(f))
                continue
            feats = self._read(f)
            if feats is None:
                refused.append(str(f))
                continue
            owner = "" if f.parent.name == "_open" else f.parent.name
            self.sets[(owner, f.stem)] = feats
        return len(self.sets), refused

    def current(self, owner: str, name: str):
        """The set as its file holds it now, for a process that reads the folder another one writes (the MLflow
        pyfunc beside the service): one stat a call; the file is read again when it changed (another file, size
        or modification time: a write renames a new file in) and forgotten when it is gone. A file that ``load``
        would refuse (unreadable, another model's) is no set. ``name`` must be a set's name (serving/inputs.py,
        check_set_name)."""
        key = (owner, name)
        if self.root is None:
            return self.get(owner, name)
        try:
            st = self._path(owner, name).stat()
        except (FileNotFoundError, NotADirectoryError):
            self.seen.pop(key, None)
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self.seen.get(key)
        if seen is None or seen[0] != stamp:
            seen = self.seen[key] = (stamp, self._read(self._path(owner, name)))
        return seen[1]

    def names(self, owner: str) -> list[str]:
        return sorted(n for o, n in self.sets if o == owner)

    def get(self, owner: str, name: str):
        return self.sets.get((owner, name))

    def used_bytes(self, owner: str) -> int:
        return sum(sum(a.nbytes for a in f) for (o, _), f in self.sets.items() if o == owner)

    def put(self, owner: str, name: str, feats: tuple, meta: dict) -> None:
        with self.lock:       # one write at a time: quotas, file and memory agree, the last PUT of a name stays
            others = [n for n in self.names(owner) if n != name]
            if len(others) >= self.max_sets:
                raise QuotaError(f"{len(others)} support sets registered, the limit per key; delete one first", 429)
            size = sum(a.nbytes for a in feats)
            old = self.get(owner, name)
            used = self.used_bytes(owner) - (sum(a.nbytes for a in old) if old else 0)
            if used + size > self.max_bytes:
                raise QuotaError(f"this set needs {size} bytes and {used} of the {self.max_bytes} per key are used; "
                                 "delete a set first", 507)
            if self.root is not None:
                path = self._path(owner, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.{next(self.count)}.tmp.npz")
                record = {**meta, "model": self.fp, "features": len(feats), "created": time.time()}
                try:
                    np.savez(tmp, meta=np.array(json.dumps(record)), **{f"f{i}": a for i, a in enumerate(feats)})
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
            self.sets[(owner, name)] = feats

    def delete(self, owner: str, name: str) -> bool:
        with self.lock:
            if self.sets.pop((owner, name), None) is None:
                return False
            if self.root is not None:
                self._path(owner, name).unlink(missing_ok=True)
            return True
