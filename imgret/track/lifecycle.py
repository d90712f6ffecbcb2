"""Run lifecycle: signals end runs as KILLED, runs left RUNNING by dead processes are found and closed, and
a sweep point that already finished is recognised by its effective configuration.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import signal
import socket

import psutil

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, STARTED_TAG = "imgret.host", "imgret.pid", "imgret.process_started"
DIGEST_TAG = "imgret.config_digest"
# Keys that cannot change a run's result: where files go, what is printed, how runs are grouped and
# tracked, whether to rerun, what a sweeper reads from it. Everything else is part of a point's identity.
NOT_RESULT_KEYS = ("paths", "tracking", "extract.progress", "skip_invalid", "force", "hydra", "data.root",
                   "objectives",
                   # The top-level index knobs reach a run only through its method's own keys (method.nprobe, ...),
                   # which stay: a sweep over nprobe runs method=flat once, and links its other points to that run.
                   "nlist", "nprobe", "ef_search", "effort", "level", "data.nlist", "quantisation", "refine_factor")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run is ended as KILLED and the process exits with 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


received_signal: int | None = None


def _on_signal(signum, frame) -> None:
    global received_signal
    if received_signal is None:
        received_signal = signum
        raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise `Interrupted` (Lightning chains our SIGTERM handler after its own)."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def interruption_exit_code() -> int | None:
    """128 + the signal that interrupted this process (130 for Ctrl-C, 143 for SIGTERM), or None.

    Lightning turns a KeyboardInterrupt inside its loop into SystemExit(1); the flag set by the
    handler is what tells an interruption from other exits."""
    return 128 + received_signal if received_signal is not None else None


def process_tags() -> dict[str, str]:
    """Who runs this run: host, pid and the process's start time (pids are reused; start times are not), and the
    Slurm job (and array task) it runs in, if any."""
    slurm = {f"slurm_{key.lower()}": os.environ[f"SLURM_{key}"] for key in ("JOB_ID", "ARRAY_JOB_ID", "ARRAY_TASK_ID")
             if f"SLURM_{key}" in os.environ}
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            STARTED_TAG: f"{psutil.Process().create_time():.2f}", **slurm}


def process_is_gone(tags: dict[str, str]) -> bool:
    """True when the run's process, on this host, no longer exists. Runs of other hosts: unknown, False."""
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return False
    try:
        process = psutil.Process(int(tags[PID_TAG]))
        return f"{process.create_time():.2f}" != tags.get(STARTED_TAG)
    except (psutil.NoSuchProcess, ValueError):
        return True


def close_runs_of_dead_processes(client, experiment_ids: list[str]) -> list[str]:
    """Mark RUNNING runs whose process on this host is gone as KILLED (tag `killed_reason`)."""
    from mlflow.entities import RunStatus

    closed = []
    running = client.search_runs(experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = "
                                 f"'{socket.gethostname()}'", max_results=5000)
    for run in running:
        if process_is_gone(run.data.tags):
            client.set_tag(run.info.run_id, "killed_reason",
                           f"process {run.data.tags.get(PID_TAG)} on {run.data.tags.get(HOST_TAG)} ended without "
                           "closing the run (killed, or the machine stopped); found by a later start")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            closed.append(run.info.run_id)
    if closed:
        log.warning("marked %d run(s) left RUNNING by dead processes as KILLED: %s", len(closed), ", ".join(closed))
    return closed


def effective_config(config: dict) -> dict:
    """The resolved config (plain values) minus the keys that cannot change the result."""
    resolved = copy.deepcopy(config)
    resolved.pop("hydra", None)
    for dotted in NOT_RESULT_KEYS:
        *parents, last = dotted.split(".")
        node = resolved
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return resolved


def config_digest(config: dict) -> str:
    """A point's identity: the digest of its resolved config's effective part."""
    return hashlib.sha256(json.dumps(effective_config(config), sort_keys=True, default=str).encode()).hexdigest()[:24]
