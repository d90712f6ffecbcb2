"""What this process and its waited-for children (DataLoader workers, ranks it started) used: CPU seconds in user
code and in the kernel, and minor page faults (a page mapped in for the first time, or again after munmap)."""
from __future__ import annotations

import resource
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuUse:
    user_s: float
    system_s: float
    minor_faults: int

    @classmethod
    def now(cls) -> "CpuUse":
        mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(mine.ru_utime + children.ru_utime, mine.ru_stime + children.ru_stime,
                   mine.ru_minflt + children.ru_minflt)

    def __add__(self, other: "CpuUse") -> "CpuUse":
        return CpuUse(self.user_s + other.user_s, self.system_s + other.system_s,
                      self.minor_faults + other.minor_faults)

    def __sub__(self, earlier: "CpuUse") -> "CpuUse":
        return CpuUse(self.user_s - earlier.user_s, self.system_s - earlier.system_s,
                      self.minor_faults - earlier.minor_faults)

    @property
    def kernel_share(self) -> float:
        """sys / (user + sys): the share of the CPU time the kernel spent for the work (NaN for none)."""
        total = self.user_s + self.system_s
        return self.system_s / total if total > 0 else float("nan")

    def record(self) -> dict:
        return {"cpu_user_s": self.user_s, "cpu_system_s": self.system_s, "minor_faults": self.minor_faults}

    @classmethod
    def of_records(cls, records) -> "CpuUse":
        """The sum of `record()`s (a missing key, from a store made before they were recorded: NaN)."""
        records = list(records)
        return cls(*(sum(r.get(key, float("nan")) for r in records)
                     for key in ("cpu_user_s", "cpu_system_s", "minor_faults")))
