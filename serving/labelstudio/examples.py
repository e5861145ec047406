"""The annotated examples that make each label's support set, per Label Studio project.

One file per (project, label, annotation): ``<store>/<project id>/<label key>/<annotation id>.npz``, where
the project and annotation ids are the integers Label Studio sends and the label key is a digest of the
label's name (the name itself is kept inside the file). No part of a path is taken from a request, so no
label or id can write outside the store, and every label (``.``, ``..``, ``a/b``, any Unicode) is found
again at start. Files are written to a temporary name and renamed. At start every file is checked (its
name, the label's digest, the support image and mask this model takes) and a bad one is named and left
alone. The ``shots`` most recent examples of a label are its support set, encoded when first needed;
``snapshot`` hands a prediction the features it uses, so a deletion while it runs changes nothing for it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("serving.labelstudio")


def label_key(label: str) -> str:
    return hashlib.sha256(label.encode("utf-8")).hexdigest()[:32]


class Examples:
    def __init__(self, root: Path | None, backend, shots: int):
        self.root, self.backend, self.shots = root, backend, shots
        self.items: dict[tuple[int, str], dict[int, tuple[float, np.ndarray, np.ndarray]]] = {}
        self.feats: dict[tuple[int, str], tuple] = {}
        self.deleted: dict[tuple[int, int], float] = {}     # (project, annotation) -> when it was deleted
        self.lock = threading.Lock()
        if root:
            self._load(Path(root))

    def _why_not(self, support, mask) -> str | None:
        """Why a stored (support, mask) is not an input of this model, or None."""
        s = self.backend.size
        if support.dtype != np.float32 or support.shape != (3, s, s) or not np.isfinite(support).all():
            return f"its support is {support.dtype} {list(support.shape)}; this model takes float32 [3, {s}, {s}]"
        if mask.dtype != np.uint8 or mask.shape != (s, s) or not set(np.unique(mask).tolist()) <= {0, 1}:
            return f"its mask is {mask.dtype} {list(mask.shape)}; this model takes 0/1 uint8 [{s}, {s}]"
        return None

    def _load(self, root: Path) -> None:
        for f in sorted(root.glob("*/*/*.npz")):
            if f.name.startswith("."):
                log.warning("%s is a temporary file a write left behind; not loaded: delete it", f)
                continue
            try:
                with np.load(f, allow_pickle=False) as z:
                    label, item = str(z["label"]), (float(z["time"]), z["support"], z["mask"])
            except Exception as e:     # a damaged file: named, left alone
                log.warning("%s is not a readable example (%s); not loaded", f, e)
                continue
            if not (f.parent.parent.name.isdigit() and f.stem.isdigit() and f.parent.name == label_key(label)):
                log.warning("%s is not where this backend stores an example of %r; not loaded", f, label)
                continue
            why = self._why_not(item[1], item[2])
            if why:
                log.warning("%s is not an example for this model (%s); not loaded: annotate again", f, why)
                continue
            self.items.setdefault((int(f.parent.parent.name), label), {})[int(f.stem)] = item

    def _file(self, key: tuple[int, str], ann: int) -> Path:
        return Path(self.root) / str(int(key[0])) / label_key(key[1]) / f"{int(ann)}.npz"

    def put(self, project: int, label: str, ann: int, support: np.ndarray, mask: np.ndarray) -> None:
        key, item = (project, label), (time.time(), support, mask)
        with self.lock:
            if self.root:
                f = self._file(key, ann)
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_name(f".{ann}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
                try:
                    np.savez(tmp, time=np.float64(item[0]), label=np.array(label), support=support, mask=mask)
                    os.replace(tmp, f)
                finally:
                    tmp.unlink(missing_ok=True)
            self.items.setdefault(key, {})[ann] = item
            self.feats.pop(key, None)

    def drop(self, project: int, ann: int, deleted: bool = True) -> int:
        """Forget annotation ``ann`` of ``project`` in every label; returns how many labels it was in. ``deleted``:
        the annotation is gone (not replaced by an update), remembered so that a sync listing made before the
        deletion does not bring it back."""
        return self.drop_many(project, [ann], deleted)

    def drop_many(self, project: int, anns, deleted: bool = True) -> int:
        anns, n = set(anns), 0
        with self.lock:
            for ann in anns:
                if deleted:
                    self.deleted[(project, ann)] = time.monotonic()
                for key, items in self.items.items():
                    if key[0] == project and items.pop(ann, None) is not None:
                        n += 1
                        self.feats.pop(key, None)
                        if self.root:
                            self._file(key, ann).unlink(missing_ok=True)
        return n

    @staticmethod
    def deleted_since() -> float:
        return time.monotonic()

    def was_deleted(self, project: int, ann: int, since: float) -> bool:
        return self.deleted.get((project, ann), -1.0) >= since

    def count(self) -> int:
        with self.lock:
            return sum(len(a) for a in self.items.values())

    def has(self, project: int, ann: int) -> bool:
        with self.lock:
            return any(ann in anns for (p, _), anns in self.items.items() if p == project)

    def annotations(self, project: int) -> set[int]:
        with self.lock:
            return {a for (p, _), anns in self.items.items() if p == project for a in anns}

    def ready(self, project: int, labels: list[str]) -> tuple[dict[str, list[int]], dict[str, str]]:
        """({label: the annotation ids of its support set} for the labels that have one, {label: why not} for
        the others)."""
        have, why = {}, {}
        k = self.backend.shots or self.shots
        with self.lock:
            for name in labels:
                anns = self.items.get((project, name), {})
                if not anns:
                    why[name] = "no annotated example yet"
                elif self.backend.shots and len(anns) < self.backend.shots:
                    why[name] = f"{len(anns)} example(s); this model (BAM) takes {self.backend.shots}"
                else:
                    have[name] = sorted(sorted(anns, key=lambda a: (anns[a][0], a))[-k:])
        return have, why

    def snapshot(self, project: int, labels: list[str]) -> tuple[dict[str, list[int]], list[tuple]]:
        """({label: its set's annotation ids}, their support features) for those of ``labels`` that have a set
        now, encoded where needed; a deletion while a prediction runs changes nothing for it."""
        used, feats = {}, []
        for name, ids in self.ready(project, labels)[0].items():
            key = (project, name)
            with self.lock:                        # the arrays are taken under the lock, encoded outside it
                anns = self.items.get(key, {})
                if not all(a in anns for a in ids):
                    continue                       # changed since ready(): left for the next prediction
                f = self.feats.get(key)
                if f is None or f[0] != ids:
                    f, s = None, np.stack([anns[a][1] for a in ids])[None]
                    m = np.stack([anns[a][2] for a in ids])[None].astype(np.float32)
            if f is None:
                f = (ids, self.backend.encode(s, m))
                with self.lock:
                    self.feats[key] = f
            used[name] = ids
            feats.append(f[1])
        return used, feats

    @staticmethod
    def version(used: dict[str, list[int]]) -> str:
        """The model version of predictions made from these sets ({label: annotation ids}): it changes when a
        set a prediction uses changes, and only then."""
        h = hashlib.sha1(json.dumps(sorted(used.items())).encode())
        return f"svf-fss-{h.hexdigest()[:10]}"
