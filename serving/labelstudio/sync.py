"""What the backend keeps in step with Label Studio, through its API (client.py), in a thread of its own:

* after a ``/setup`` (and on ``START_TRAINING``, Label Studio's "Start training"): the project's annotations
  made before the backend was connected, or while it was down, become examples; examples whose annotation
  is gone are dropped;
* the project's webhook to this backend (Label Studio creates it when the model is connected, without the
  basic auth it needs): created when missing, given the basic-auth header when the backend asks for one;
  where Label Studio refuses (its SSRF protection), the reason goes to the log and to ``/health``;
* after a ``/predict``, the task's earlier predictions from this backend are deleted once Label Studio has
  stored the new one, so that a task shows one prediction, the current one.

Each problem is kept under its topic until a later run clears it: ``/health`` lists them, so that a team
does not meet a silent "Connected".
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse

from ..inputs import UserError

log = logging.getLogger("serving.labelstudio")


class Sync:
    def __init__(self, b, basic_header: str | None, port: int | None):
        self.b, self.basic, self.port = b, basic_header, port
        self.problems: dict[str, str] = {}
        self.lock = threading.Lock()
        self.running: set[int] = set()
        self.jobs: list[tuple[dict, str]] = []        # replace(): rounds waiting for the worker
        self.worker: threading.Thread | None = None

    def problem(self, topic: str, message: str | None) -> None:
        if message is None:
            self.problems.pop(topic, None)
        elif self.problems.get(topic) != message:
            self.problems[topic] = message
            log.warning("%s", message)

    def start(self, fn, *args) -> None:
        threading.Thread(target=fn, args=args, daemon=True, name="ls-sync").start()

    # ------------------------------------------------------------------ after /setup or START_TRAINING
    def project(self, pid: int, cfg, delays=(0.5, 3, 10)) -> None:
        """Bring project ``pid`` in step (in the background, a few times: Label Studio calls /setup before it
        has saved the model's connection and created the webhook)."""
        if not self.b.ls.url or not self.b.ls.token:
            self.problem("token", "no Label Studio token: annotations made before the backend was connected are "
                          "not read and the webhook is not checked (give --ls-url and --ls-token <personal access "
                          "token>)")
            return
        with self.lock:
            if pid in self.running:
                return
            self.running.add(pid)

        def run():
            try:
                read = False
                for delay in delays:
                    time.sleep(delay)
                    read = read or self.once(pid, lambda: self.annotations(pid, cfg))
                    self.once(pid, lambda: self.webhook(pid))
            finally:
                with self.lock:
                    self.running.discard(pid)
        self.start(run)

    def once(self, pid: int, step) -> bool:
        """Run one step; a failure becomes the problem of its topic (the token, or the project)."""
        try:
            step()
            self.problem("token", None)
            return True
        except UserError as e:
            self.problem("token" if e.status == 401 else f"project {pid}", f"project {pid}: {e}")
        except Exception as e:         # Label Studio unreachable, an answer of another form: named, retried later
            self.problem(f"project {pid}", f"project {pid}: cannot read it from Label Studio ({type(e).__name__}: {e})")
        return False

    def annotations(self, pid: int, cfg) -> None:
        b, seen, added = self.b, set(), 0
        known, deleted = b.examples.annotations(pid), b.examples.deleted_since()
        for task in b.ls.pages("/api/tasks", "tasks", {"project": pid, "fields": "all"}):
            for ann in task.get("annotations") or []:
                aid = ann.get("id")
                if not isinstance(aid, int) or ann.get("was_cancelled"):
                    continue
                seen.add(aid)
                if b.examples.has(pid, aid) or b.examples.was_deleted(pid, aid, deleted):
                    continue                   # stored already, or deleted by a webhook since this run began
                try:
                    regions = b.regions(cfg, aid, ann.get("result"))
                    if regions:
                        img = b.images.read((task.get("data") or {}).get(cfg.data_key), f"annotation {aid}'s image",
                                            task.get("id"))
                        b.store(pid, aid, regions, img)
                        added += 1
                except UserError as e:       # that annotation is left out, the others go on
                    log.warning("project %s: annotation %s not used: %s", pid, aid, e)
        gone = known - seen                    # only what was stored before the listing began
        b.examples.drop_many(pid, gone)
        if added or gone:
            log.info("project %s: %d annotation(s) read from Label Studio, %d gone", pid, added, len(gone))

    def webhook(self, pid: int) -> None:
        ls = self.b.ls
        r = ls.request("GET", "/api/ml", params={"project": pid})
        if r.status_code != 200:
            raise UserError(f"Label Studio answered /api/ml with HTTP {r.status_code}: {r.text[:200]}")
        mine = self.mine(r.json())
        if mine is None:
            return                             # not saved yet (Label Studio calls /setup first): the next run
        url = mine["url"].rstrip("/") + "/webhook"
        hooks = ls.request("GET", "/api/webhooks/", params={"project": pid}).json()
        hook = next((h for h in hooks if isinstance(h, dict) and h.get("url") == url), None)
        headers = {"Authorization": self.basic} if self.basic else {}
        if hook is None:
            r = ls.request("POST", "/api/webhooks/", json={"project": pid, "url": url, "send_payload": True,
                                                           "send_for_all_actions": True, "headers": headers,
                                                           "is_active": True})
            if r.status_code >= 400:
                detail = r.json().get("detail", r.text) if "json" in r.headers.get("content-type", "") else r.text
                self.problem(f"webhook {pid}", f"project {pid}: Label Studio refuses a webhook to {url} "
                              f"({str(detail)[:200]}), so annotations never reach this backend: start Label Studio with "
                              "SSRF_PROTECTION_ENABLED=false (and ML_BLOCK_LOCAL_IP=false) when the backend runs on "
                              "its machine or network; the backend creates the webhook at the next /setup")
                return
            log.info("project %s: webhook to %s created", pid, url)
        elif self.basic and (hook.get("headers") or {}).get("Authorization") != self.basic:
            ls.request("PATCH", f"/api/webhooks/{hook['id']}/",
                       json={"headers": {**(hook.get("headers") or {}), **headers}}).raise_for_status()
            log.info("project %s: webhook %s given this backend's basic auth", pid, hook["id"])
        self.problem(f"webhook {pid}", None)

    def mine(self, backends) -> dict | None:
        """Which of the project's ML backends is this one, identified positively (another backend must never get
        this one's webhook or credentials): the one with this backend's basic-auth user, else the one on this
        backend's port; None when that is not exactly one."""
        backends = [m for m in backends if isinstance(m, dict) and isinstance(m.get("url"), str)] \
            if isinstance(backends, list) else []
        if self.b.auth_user:
            backends = [m for m in backends if m.get("basic_auth_user") == self.b.auth_user]
        elif self.port:
            backends = [m for m in backends if urllib.parse.urlsplit(m["url"]).port == self.port]
        else:
            return None
        return backends[0] if len(backends) == 1 else None

    # ------------------------------------------------------------------ after /predict
    def replace(self, before: dict[int, set[int]], version: str) -> None:
        """Once Label Studio has stored this round's prediction of each task (``version``, an id not in
        ``before``), delete the task's earlier predictions from this backend (those in ``before``); one worker
        for all rounds, polling at 0.5, 1, 2, 4, 8 and 16 s."""
        if not any(before.values()):
            return
        with self.lock:
            self.jobs.append((before, version))
            if self.worker is None or not self.worker.is_alive():
                self.worker = threading.Thread(target=self._replace_all, daemon=True, name="ls-replace")
                self.worker.start()

    def _replace_all(self) -> None:
        while True:
            with self.lock:
                if not self.jobs:
                    self.worker = None
                    return
                before, version = self.jobs.pop(0)
            left = {t: old for t, old in before.items() if old}
            for delay in (0.5, 1, 2, 4, 8, 16):
                if not left:
                    break
                time.sleep(delay)
                try:
                    for task, old in list(left.items()):
                        preds = self.predictions(task)
                        if any(p.get("id") not in old and p.get("model_version") == version for p in preds):
                            for p in preds:
                                if p.get("id") in old:
                                    self.b.ls.request("DELETE", f"/api/predictions/{int(p['id'])}/")
                            del left[task]
                except Exception as e:       # Label Studio unreachable: those predictions stay, the worker goes on
                    log.warning("earlier predictions not replaced (%s: %s)", type(e).__name__, e)
                    break

    def predictions(self, task: int) -> list[dict]:
        """The task's predictions from this backend."""
        r = self.b.ls.request("GET", "/api/predictions/", params={"task": task})
        if r.status_code != 200 or not isinstance(r.json(), list):
            return []
        return [p for p in r.json() if isinstance(p, dict) and str(p.get("model_version", "")).startswith("svf-fss-")
                and not str(p.get("model_version")).startswith("svf-fss-file-")]   # imports of serving.predict's
