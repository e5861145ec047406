"""How many threads a model call may use now: the cores this process may run on, less those that other
processes keep busy at this moment, at least one (cpp/src/threads.cpp is the same rule in C++).

PyTorch's default, one OpenMP thread per core busy-waiting at every barrier, collapses when other work holds
the cores: a parallel region waits for a thread the scheduler has not run. `serving.predict --backend aoti`,
40 queries at 96 px on 2 cores (benchmarks/contention.py): see docs/cpp.md for the figures. The busy cores
are read per query from /proc/loadavg's runnable count, less this process's own runnable threads (about
0.1 ms).
"""
from __future__ import annotations

import os


def _own_runnable() -> int:
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        if s[s.rfind(b")") + 2:][:1] == b"R":
            n += 1
    return max(n, 1)


def fair_threads() -> int:
    cores = len(os.sched_getaffinity(0)) or 1
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return cores
    return min(cores, max(1, cores - max(0, runnable - _own_runnable())))


def share_fairly(torch) -> None:
    """Set torch's intra-op threads to ``fair_threads()`` when that changed (before each model call)."""
    n = fair_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
