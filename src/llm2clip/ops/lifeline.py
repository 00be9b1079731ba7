"""Ties the task processes of a local run to the CLI that started them, so that no task outlives the run.

- Ctrl-C or SIGTERM to the CLI: `on_stop_signal` stops every process below it (SIGTERM, then SIGKILL after a grace
  period; KFP's SubprocessRunner starts each task as `sh -c` with Python below it) and the CLI exits non-zero.
- kill -9 of the CLI, which can run no handler: each task watches the CLI's pid (LLM2CLIP_PARENT_PID, set by the CLI
  for its tasks) from a thread started when the task imports llm2clip (the first thing each component body does),
  and ends itself within WATCH_INTERVAL_S of the CLI's death (measured 1.0-1.2 s), or of that import if the task
  was still starting. A dead but unreaped CLI is a zombie and counts as gone.
The process tree comes from psutil (Linux, macOS, Windows), which peft and accelerate already install.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import psutil

PARENT_ENV = "LLM2CLIP_PARENT_PID"
WATCH_INTERVAL_S = 1.0
GRACE_S = 5.0


class Stopped(BaseException):
    """Raised in the CLI's main thread by SIGINT / SIGTERM once its task processes are stopped (a BaseException,
    like KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first, then theirs); [] once `pid` is gone."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) is not alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def stop_tree(pid: int, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every process below `pid`, SIGKILL those still there after `grace_s`; returns the pids found.

    Waits by polling `alive`, not with psutil.wait_procs: that reaps our own children (the `sh -c` of each task),
    and KFP's Popen would then read a killed task's exit status as 0. psutil's Process checks its creation time
    before each signal, so a pid reused during the grace period is not signalled."""
    found: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        found = psutil.Process(pid).children(recursive=True)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        left = [p for p in found if alive(p.pid)]
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while any(alive(p.pid) for p in left) and time.monotonic() < deadline:
            time.sleep(0.05)
    return [p.pid for p in found]


@contextlib.contextmanager
def on_stop_signal(grace_s: float = GRACE_S) -> Iterator[None]:
    """In the CLI: SIGINT and SIGTERM stop every process below this one, then raise Stopped here.

    Installed explicitly because a CLI started in the background by a non-interactive shell inherits SIGINT as
    ignored, and because KFP's task handler waits for its subprocess when an exception other than
    KeyboardInterrupt passes its `with Popen(...)`: the children must be gone before the exception is raised."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nllm2clip: {signal.Signals(signum).name}: stopping the run's task processes", file=sys.stderr)
        stop_tree(os.getpid(), grace_s)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ[PARENT_ENV] = str(os.getpid())
    try:
        yield
    finally:
        os.environ.pop(PARENT_ENV, None)
        for s, h in previous.items():
            signal.signal(s, h)


def watch_parent(interval_s: float = WATCH_INTERVAL_S) -> threading.Thread | None:
    """In a task: a daemon thread that ends this process once the CLI named by LLM2CLIP_PARENT_PID is gone.
    Does nothing outside a local run (no variable) or in the CLI itself."""
    raw = os.environ.get(PARENT_ENV, "")
    if not raw.isdigit() or int(raw) == os.getpid():
        return None
    cli = int(raw)

    def watch() -> None:
        while alive(cli):
            time.sleep(interval_s)
        try:  # stderr is often a pipe into the dead CLI: writing to it may fail, exiting must not
            print(f"llm2clip: the CLI (pid {cli}) that started this task is gone; ending the task", file=sys.stderr)
        finally:
            os._exit(143)

    thread = threading.Thread(target=watch, name="llm2clip-lifeline", daemon=True)
    thread.start()
    return thread
