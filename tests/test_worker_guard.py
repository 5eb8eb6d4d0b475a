"""A benchmark runner killed with SIGKILL must not leave its pool workers writing into the workdir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

RUNNER = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from lit_tokensel_bench.worker_guard import exit_with_parent

    def job(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)

    if __name__ == "__main__":
        initializer = exit_with_parent if sys.argv[2] == "guarded" else None
        pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=initializer,
                                   initargs=(0.2,) if initializer else ())
        pool.submit(job, sys.argv[1])
        time.sleep(120)
    """
)


def running(pid: int) -> bool:
    """Whether `pid` is a live process; an exited one that its new parent has not reaped yet (a zombie, where
    PID 1 does not reap promptly) counts as ended."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def worker_alive_after_runner_killed(tmp_path: Path, mode: str) -> bool:
    """Start a runner with one pool worker, SIGKILL the runner, report whether the worker lives 3 s later."""
    script, pid_file = tmp_path / "runner.py", tmp_path / f"worker-{mode}.pid"
    script.write_text(RUNNER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "benchmarks"), *sys.path]),
    }
    runner = subprocess.Popen([sys.executable, str(script), str(pid_file), mode], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        time.sleep(3)
        if not running(worker):
            return False
        os.kill(worker, signal.SIGKILL)  # do not leave it behind, whatever the assertion says
        return True
    finally:
        if runner.poll() is None:
            runner.kill()


@pytest.mark.skipif(sys.platform != "linux", reason="re-parenting to init is Linux behaviour")
def test_guarded_worker_ends_with_its_runner_and_unguarded_one_does_not(tmp_path: Path) -> None:
    assert worker_alive_after_runner_killed(tmp_path, "plain")  # the failure the guard exists for
    assert not worker_alive_after_runner_killed(tmp_path, "guarded")
