"""What a query and a build cost in money, from a run's own figures and the prices of compute it is given (the `cost`
group of conf/config.yaml): the machine a run measured is priced as rented by the hour, its cores at `core_hour_usd`,
the index held in memory at `memory_gib_month_usd` and a database's files on disk at `disk_gib_month_usd` (a month is
730 hours, as cloud price lists count it).

- `usd_per_million_queries`: one client sending one query at a time (1000 / the median single-query latency queries a
  second) on `search.threads` cores, with the index in memory and the database's files on disk, for a million
  queries.
- `usd_per_million_queries_clients_N`: the same at the throughput of N concurrent clients (`search.clients`), on
  N x `search.threads` cores, at most the machine's.
- `build_usd`: the build's time on the run's `threads` cores (an engine that sizes its own thread pools, LanceDB's or
  Qdrant's, may have used more), memory and disk left out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from imgret.errors import bad_value, number
from imgret.options import config_defaults

HOURS_PER_MONTH = 730
_COST = config_defaults().cost


@dataclass(frozen=True)
class Prices:
    """The prices of compute a run's costs are figured at, in US dollars; the defaults are conf/config.yaml's."""
    core_hour_usd: float = _COST.core_hour_usd
    memory_gib_month_usd: float = _COST.memory_gib_month_usd
    disk_gib_month_usd: float = _COST.disk_gib_month_usd

    @staticmethod
    def check_section(cost) -> None:
        """The `cost` group's keys, as written: each a price >= 0 in US dollars."""
        for key, unit in (("core_hour_usd", "a core-hour"), ("memory_gib_month_usd", "a GiB-month of memory"),
                          ("disk_gib_month_usd", "a GiB-month of disk")):
            value = cost.get(key)
            if not number(value) or value < 0:
                raise bad_value(f"cost.{key}", value, f"the price of {unit} in US dollars, a number >= 0")

    @classmethod
    def from_config(cls, cfg) -> "Prices":
        cost = cfg.get("cost") or {}
        return cls(**{key: float(cost.get(key, getattr(cls, key))) for key in cls.__dataclass_fields__})

    def hourly_usd(self, cores: float, memory_bytes: float, disk_bytes: float) -> float:
        return (cores * self.core_hour_usd + memory_bytes / 2**30 * self.memory_gib_month_usd / HOURS_PER_MONTH
                + disk_bytes / 2**30 * self.disk_gib_month_usd / HOURS_PER_MONTH)


def per_million_queries(hourly_usd: float, queries_per_s: float) -> float:
    return hourly_usd / 3600.0 / queries_per_s * 1e6 if queries_per_s > 0 else float("nan")


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cost_metrics(prices: Prices, metrics: dict[str, float], search_threads: int, build_threads: int) -> dict[str, float]:
    """The cost metrics of one run's figures (`metrics`: its latency, its clients' throughput, its index's sizes)."""
    memory, disk = metrics["index_bytes"], metrics.get("db_disk_bytes", 0.0)
    single_qps = 1000.0 / metrics["search_ms_p50"] if metrics["search_ms_p50"] > 0 else 0.0
    costs = {"usd_per_million_queries": per_million_queries(prices.hourly_usd(search_threads, memory, disk), single_qps),
             "build_usd": metrics["build_s"] / 3600.0 * build_threads * prices.core_hour_usd}
    for key, qps in metrics.items():
        if key.startswith("qps_clients_"):
            clients = int(key.removeprefix("qps_clients_"))
            cores = min(clients * search_threads, machine_cores())
            costs[f"usd_per_million_queries_clients_{clients}"] = per_million_queries(
                prices.hourly_usd(cores, memory, disk), qps)
    return costs


def cheapest_usd(run: dict) -> float:
    """A run's lowest cost per million queries: one client, or the best of its concurrent-client counts."""
    return min([value for key, value in run.items() if key.startswith("usd_per_million_queries")
                and value == value] or [float("nan")])
