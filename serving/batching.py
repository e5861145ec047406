"""The micro-batcher: concurrent decode requests with the same shot count become one backend call.

A batch closes when it is full or when its oldest request has waited ``batch_window_ms`` since it arrived;
a batch whose backend call fails reruns its requests one by one, so only the request that broke it fails.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import torch

from .backends import Backend
from .threads import share_fairly

log = logging.getLogger("serving.app")


@dataclass
class Pending:
    """One query waiting for the backend: its tensor, its set's features, the future its request awaits and
    when it arrived (the event loop's clock)."""
    query: np.ndarray
    feats: tuple
    future: asyncio.Future
    arrived: float


class Batcher:
    """Runs concurrent decode requests as one backend call per shot count. A batch closes when it is
    full or when its oldest request has waited ``batch_window_ms`` since it arrived: requests that
    queued while the backend was busy have waited already and go at once, so the backend never idles
    on a window while work is waiting (counted from when the batcher took a request, the window kept
    the backend idle for up to 5 ms after every call); only a request reaching an idle backend waits
    for company."""

    def __init__(self, backend: Backend, limits, batch_hist):
        self.backend, self.limits, self.batch_hist = backend, limits, batch_hist
        self.queue: asyncio.Queue | None = None
        self.task = None

    def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self):
        if self.task:
            self.task.cancel()

    async def decode(self, query: np.ndarray, feats) -> np.ndarray:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put_nowait(Pending(query, feats, fut, loop.time()))
        return await asyncio.wait_for(fut, timeout=self.limits.timeout_s)

    def _decode(self, queries: list, feats: list) -> np.ndarray:
        """One backend call for the batch; the stacking too runs off the event loop (at 473 px a batch of
        8 queries is 21 MB to copy)."""
        if self.backend.cpu_torch:
            share_fairly(torch)
        return self.backend.decode(np.concatenate(queries, 0), Backend.batch_features(feats))

    async def collect(self) -> list[Pending]:
        """The next batch: the oldest request, what else is queued, and until the oldest's window closes
        whatever arrives, up to ``max_batch``."""
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = items[0].arrived + self.limits.batch_window_ms / 1000
        while len(items) < self.limits.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return items

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            groups: dict = {}
            for p in await self.collect():
                groups.setdefault(tuple(f.shape[1:] for f in p.feats), []).append(p)
            for group in groups.values():
                live = [p for p in group if not p.future.done()]
                if not live:
                    continue
                self.batch_hist.observe(len(live))
                try:
                    out = await loop.run_in_executor(None, self._decode, [p.query for p in live],
                                                     [p.feats for p in live])
                    for i, p in enumerate(live):
                        if not p.future.done():
                            p.future.set_result(out[i:i + 1])
                except Exception as e:    # a backend failure answers those requests, the loop goes on
                    if len(live) == 1:
                        log.exception("batch failed")
                        if not live[0].future.done():
                            live[0].future.set_exception(e)
                        continue
                    # one request's set may be what failed: each alone, so that only its own request fails
                    log.warning("a batch of %d failed (%s); running its requests one by one", len(live), e)
                    for p in live:
                        try:
                            out = await loop.run_in_executor(None, self._decode, [p.query], [p.feats])
                            if not p.future.done():
                                p.future.set_result(out)
                        except Exception as one:
                            log.exception("request failed")
                            if not p.future.done():
                                p.future.set_exception(one)


