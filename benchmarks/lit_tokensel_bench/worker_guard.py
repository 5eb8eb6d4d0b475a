"""Benchmark worker processes end with the runner that started them.

A runner killed with SIGKILL (or its terminal closed) leaves its `ProcessPoolExecutor` workers running: they
are re-parented to init and go on writing into the workdir, where a resumed runner then starts the same jobs
again, two processes writing one run directory. `exit_with_parent` is the pool's initializer: a daemon thread
in each worker watches the parent's pid and ends the worker when the parent is gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_SECONDS = 2.0


def exit_with_parent(poll_seconds: float = POLL_SECONDS) -> None:
    """Start the watch in this (worker) process; the worker gets SIGTERM within `poll_seconds` of its parent's
    death. Nothing of the job's is half-written by that: results are written atomically, and a job without
    its result file is redone from the start by the resumed runner."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
