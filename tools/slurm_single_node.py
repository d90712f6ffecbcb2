"""A single-node Slurm on this machine, started without systemd, for imgret's cluster tests and for trying its
Slurm commands: `python tools/slurm_single_node.py start <folder>` writes a slurm.conf for this host into <folder>,
starts munged, slurmctld and slurmd (as root, bound to 127.0.0.1), waits until `sinfo` shows the node idle and prints
the `export SLURM_CONF=...` line the Slurm commands need; `python tools/slurm_single_node.py stop <folder>` stops
every daemon it started by the pid it recorded.

Needs Debian's packages: `apt-get install -y --no-install-recommends slurm-wlm munge` (.ci/run installs them).
Accounting and job completion logging are off: submitit's "Bypassing sacct error" warning is expected.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why a Slurm cannot start here, or None."""
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    absent = [name for name in (*DAEMONS, "sinfo", "sbatch", "srun") if shutil.which(name) is None]
    if absent:
        return (f"{', '.join(absent)} not installed: apt-get install -y --no-install-recommends slurm-wlm munge")
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (the munge package makes it)"
    return None


def node_line() -> str:
    """This host's node definition as slurmd measures it (`slurmd -C`), addressed on the loopback."""
    measured = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return measured.replace(f"NodeName={socket.gethostname().split('.')[0]}",
                            f"NodeName={socket.gethostname().split('.')[0]} NodeAddr=127.0.0.1", 1)


def write_conf(folder: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=imgret", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "SlurmctldAddr=127.0.0.1", "AuthType=auth/munge", "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none", "ReturnToService=2", "KillWait=10",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
        node_line(), f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    return conf


def start(folder: Path, timeout_s: float = 60) -> dict:
    """Start the daemons; return {"conf": ..., "pids": {daemon: pid}} once the node is idle (also saved as
    <folder>/daemons.json for `stop`)."""
    why = missing()
    if why:
        raise RuntimeError(f"Slurm cannot start here: {why}")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    conf = write_conf(folder)
    munge = pwd.getpwnam("munge")
    Path("/run/munge").mkdir(exist_ok=True)
    os.chown("/run/munge", munge.pw_uid, munge.pw_gid)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pids = {}
    started = {"conf": str(conf), "pids": pids}
    try:
        logs = {name: open(folder / f"{name}.out", "ab") for name in DAEMONS}
        pids["munged"] = subprocess.Popen(["munged", "--foreground", "--force"], user=munge.pw_uid, group=munge.pw_gid,
                                          stdout=logs["munged"], stderr=subprocess.STDOUT,
                                          start_new_session=True).pid
        wait_for(lambda: Path("/run/munge/munge.socket.2").exists(), timeout_s, "munged's socket")
        for name in ("slurmctld", "slurmd"):
            pids[name] = subprocess.Popen([name, "-D", "-f", str(conf)], env=env, stdout=logs[name],
                                          stderr=subprocess.STDOUT, start_new_session=True).pid
        (folder / "daemons.json").write_text(json.dumps(started))
        wait_for(lambda: node_state(env) == "idle", timeout_s, "sinfo to show the node idle")
    except BaseException:
        stop(folder, started)
        raise
    return started


def node_state(env: dict) -> str:
    done = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(0.5)


def stop(folder: Path, started: dict | None = None) -> None:
    """SIGTERM to each daemon this folder's start recorded, slurmd first; SIGKILL to any still there after 10 s."""
    folder = Path(folder).resolve()
    if started is None:
        started = json.loads((folder / "daemons.json").read_text())
    for name in ("slurmd", "slurmctld", "munged"):
        pid = started["pids"].get(name)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:  # started by another process: gone when signal 0 fails
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: python tools/slurm_single_node.py start|stop <folder>")
    if sys.argv[1] == "start":
        print(f"export SLURM_CONF={start(Path(sys.argv[2]))['conf']}")
    else:
        stop(Path(sys.argv[2]))
