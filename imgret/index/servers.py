"""Database servers imgret starts itself: one process tree per run, reachable only through a unix socket in its
working folder (or 127.0.0.1), stopped by its pid when the run ends, fails or is interrupted, so that none outlives
the run.

- Started from one long-lived thread with `setpriv --pdeathsig`: if the run's process dies without a chance to stop
  it (kill -9), the kernel sends the server its stop signal. The death signal is tied to the thread that forked,
  which is why every server is started from the same thread, one that lives as long as the process.
- As root, a server that refuses root (PostgreSQL) runs as `nobody`, owning its working folder.
- Every server still running is stopped at interpreter exit; `stop()` waits, then kills what is left of its tree.
"""
from __future__ import annotations

import atexit
import logging
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import psutil

from imgret.errors import ImgretError

log = logging.getLogger(__name__)

UNPRIVILEGED_USER = "nobody"
_LAUNCHER = ThreadPoolExecutor(1, thread_name_prefix="imgret-server-launcher")
_LIVE: set["Server"] = set()
_LIVE_LOCK = threading.Lock()


class ServerFailed(ImgretError):
    """A database server that did not start (or stopped): one line with the last lines of its log."""


def unprivileged() -> tuple[int, int] | None:
    """(uid, gid) a server that refuses root runs as when imgret runs as root; None when it is not root."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return entry.pw_uid, entry.pw_gid


def hand_over(folder: Path, owner: tuple[int, int] | None) -> None:
    """`folder` and everything in it owned by `owner` (the server's user), when there is one."""
    if owner is None:
        return
    for root, dirs, files in os.walk(folder):
        os.chown(root, *owner)
        for name in files:
            os.chown(os.path.join(root, name), *owner, follow_symlinks=False)


def last_lines(path: Path, count: int = 3) -> str:
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-count:]) or "(empty log)"


class Server:
    """A running server's process tree: its pid, its log, its memory, and how to stop it."""

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path, stop_signal: int,
                 stop_timeout_s: float = 20.0, graceful: bool = True):
        self.name, self.process, self.log_path, self.stop_signal = name, process, log_path, stop_signal
        self.stop_timeout_s, self.graceful = stop_timeout_s, graceful
        self.peak_resident_bytes = 0
        self._sampling = threading.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[psutil.Process]:
        """The server's process and every process it forked (PostgreSQL's backends and workers)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def resident_bytes(self) -> int:
        """The resident set of the whole tree now (shared pages counted in each process: an upper bound)."""
        total = 0
        for process in self.tree():
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        self.peak_resident_bytes = max(self.peak_resident_bytes, total)
        return total

    def sample_memory(self, every_s: float = 0.25) -> None:
        """Sample the tree's resident set in the background until `stop()`: `peak_resident_bytes` is the largest."""
        def sample():
            while not self._sampling.wait(every_s):
                self.resident_bytes()

        threading.Thread(target=sample, name=f"{self.name}-memory", daemon=True).start()

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Its stop signal to the server's pid, a wait (`stop_timeout_s`), then SIGKILL to whatever is left of its
        tree."""
        timeout_s = self.stop_timeout_s
        self._sampling.set()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if not self.running():
            return
        tree = self.tree()
        try:
            self.process.send_signal(self.stop_signal)
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            (log.warning if self.graceful else log.info)("%s (pid %d) did not stop in %.0f s: killed", self.name,
                                                          self.pid, timeout_s)
        for process in tree:
            try:
                process.kill()
            except psutil.Error:
                pass
        self.process.wait()


def start_server(name: str, command: Sequence[str | Path], ready: Callable[[], bool], log_path: Path,
                 stop_signal: int = signal.SIGTERM, as_user: tuple[int, int] | None = None,
                 timeout_s: float = 60.0, env: dict | None = None, stop_timeout_s: float = 20.0,
                 graceful: bool = True) -> Server:
    """Start `command` (a server that listens on a unix socket or 127.0.0.1 only), wait until `ready()` is true,
    and return it running. A server that exits or is not ready in time: ServerFailed with its log's last lines.
    `stop_timeout_s`: how long `stop()` waits after the stop signal before it kills the tree; `graceful`: False for a
    server whose own stop is not expected to finish (its kill is then no warning)."""
    setpriv = shutil.which("setpriv")
    # the kernel's signal if the run dies first: the stop signal, or SIGKILL where the server's own stop does not finish
    death_signal = signal.Signals(stop_signal if graceful else signal.SIGKILL).name.removeprefix("SIG")
    death = [setpriv, "--pdeathsig", death_signal, "--"] if setpriv else []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as output:
        process = _LAUNCHER.submit(
            subprocess.Popen, [*death, *map(str, command)], stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, user=as_user[0] if as_user else None, group=as_user[1] if as_user else None,
            env=env, start_new_session=True).result()
    server = Server(name, process, log_path, stop_signal, stop_timeout_s, graceful)
    with _LIVE_LOCK:
        _LIVE.add(server)
    deadline = time.monotonic() + timeout_s
    while True:
        if not server.running():
            server.stop()
            raise ServerFailed(f"{name} exited with code {process.returncode} while starting (log {log_path}: "
                               f"{last_lines(log_path)})")
        try:
            if ready():
                break
        except Exception:  # not accepting connections yet
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerFailed(f"{name} was not ready after {timeout_s:.0f} s (log {log_path}: {last_lines(log_path)})")
        time.sleep(0.1)
    log.info("%s started: pid %d, log %s", name, server.pid, log_path)
    server.sample_memory()
    return server


def live_servers() -> list[Server]:
    with _LIVE_LOCK:
        return list(_LIVE)


def stop_all() -> None:
    """Every server this process started and has not stopped: at the end of a run, on a failure, at exit."""
    for server in live_servers():
        server.stop()


atexit.register(stop_all)
