"""Run a command inside a memory cgroup of its own, capped: `python tools/memory_cap.py 8G -- python -m imgret.run ...`.

The cap covers everything the command's processes are charged for, the page cache of the files they read and write
included (the kernel reclaims that under the cap; a run whose resident memory exceeds it is killed by the kernel's
OOM killer, and this exits with the command's code, 137). At the end it prints one line: the cap, the cgroup's
peak charge (memory.max_usage_in_bytes, page cache included), how often the cap was hit and whether the OOM
killer ran. It first writes dirty pages back and drops the page cache (unless --keep-cache): a page already cached
is charged to whichever cgroup read it first (the root, once that cgroup is gone), so a command could otherwise map
gigabytes of a file an earlier run read without their counting against its cap. The cgroup is made under the cgroup v1 memory hierarchy (/sys/fs/cgroup/memory) or, on a cgroup v2
host, under /sys/fs/cgroup; it is removed at the end. Needs root. Signals (Ctrl-C, SIGTERM) reach the command.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


def parse_bytes(text: str) -> int:
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not found or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"cap {text!r}: a size such as 8G, 1536M or 300000000 (bytes), above 0")
    return int(float(found.group(1)) * UNITS[found.group(2).upper()])


def unavailable() -> str | None:
    """Why a capped cgroup cannot be made here, or None."""
    if os.geteuid() != 0:
        return "making a memory cgroup needs root"
    if (V1 / "memory.limit_in_bytes").exists():
        return None if os.access(V1, os.W_OK) else f"{V1} is not writable"
    if "memory" in (V2 / "cgroup.controllers").read_text().split() if (V2 / "cgroup.controllers").exists() else False:
        return None if os.access(V2, os.W_OK) else f"{V2} is not writable"
    return "no cgroup memory controller: neither /sys/fs/cgroup/memory (v1) nor memory in /sys/fs/cgroup (v2)"


class CappedGroup:
    """A fresh memory cgroup with a cap; `files` name the knobs of the hierarchy it lives in."""

    def __init__(self, cap: int):
        self.v1 = (V1 / "memory.limit_in_bytes").exists()
        self.path = (V1 if self.v1 else V2) / f"imgret-cap-{os.getpid()}"
        self.path.mkdir()
        if self.v1:
            (self.path / "memory.limit_in_bytes").write_text(str(cap))
            swap_limit = self.path / "memory.memsw.limit_in_bytes"
            if swap_limit.exists():  # the cap holds with swap too: memory + swap together
                swap_limit.write_text(str(cap))
        else:
            (self.path / "memory.max").write_text(str(cap))
            if (self.path / "memory.swap.max").exists():  # absent without swap accounting
                (self.path / "memory.swap.max").write_text("0")

    def enter(self) -> None:
        """Moves the calling process (the command, before it execs) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def report(self) -> dict:
        if self.v1:
            oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
            return {"peak": int((self.path / "memory.max_usage_in_bytes").read_text()),
                    "cap_hits": int((self.path / "memory.failcnt").read_text()),
                    "oom_kills": int(oom.get("oom_kill", 0))}
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        peak = self.path / "memory.peak"  # kernels from 5.19
        return {"peak": int(peak.read_text()) if peak.exists() else -1,
                "cap_hits": int(events.get("max", 0)), "oom_kills": int(events.get("oom_kill", 0))}

    def remove(self) -> None:
        for _ in range(50):  # the last process's exit is accounted a moment after wait() returns
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="python tools/memory_cap.py [--keep-cache] CAP -- COMMAND [ARG ...]")
    parser.add_argument("cap", type=parse_bytes, help="the memory cap: 8G, 1536M, or bytes")
    parser.add_argument("--keep-cache", action="store_true",
                        help="leave the page cache as it is (pages cached before are not charged to the command)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: give it after --, e.g. memory_cap.py 8G -- python -m imgret.run")
    why = unavailable()
    if why:
        print(f"error: cannot cap memory here: {why}", file=sys.stderr)
        return 2
    if not args.keep_cache:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
    group = CappedGroup(args.cap)
    try:
        child = subprocess.Popen(command, preexec_fn=group.enter)
        for sig in (signal.SIGINT, signal.SIGTERM):  # passed on; the command decides how to stop
            signal.signal(sig, lambda number, frame: child.send_signal(number))
        code = child.wait()
        found = group.report()
        print(f"memory cap {args.cap / 2 ** 30:.2f} GiB: cgroup peak {found['peak'] / 2 ** 30:.2f} GiB (page cache "
              f"included), cap reached {found['cap_hits']} times, OOM kills {found['oom_kills']}, exit {code}",
              file=sys.stderr)
        return 128 - code if code < 0 else code
    finally:
        group.remove()


if __name__ == "__main__":
    sys.exit(main())
