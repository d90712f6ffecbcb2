"""Milvus: the Milvus 2.3 standalone server the `milvus` wheel carries (its etcd embedded, its data on local disk),
started by imgret for the run in a network namespace of its own, reached through pymilvus's `MilvusClient`.

Milvus 2.3 listens on every interface and cannot be told otherwise (milvus-io/milvus#26538), so the server runs in
a new network namespace (`unshare --net`) whose only interface is its own loopback: nothing outside the namespace
can reach any of its ports. Inside it, `socat` forwards a unix socket in the database's folder to the proxy's gRPC
port, and the client connects to that socket (`unix:` URIs are pymilvus's own). The server's pid is the one imgret
started (unshare and its shell exec into it), its forwarder its child, both stopped with it.

One collection: the row number as its INT64 primary key and the row as a FLOAT_VECTOR, metric IP. Rows go in by
`insert` calls of a few thousand, then `flush` seals them into segments, `create_index` builds each sealed
segment's index (HNSW: `M`, `efConstruction`; IVF_FLAT: `nlist`), and `load_collection` loads the collection for
search; each segment is searched with `ef` or `nprobe` and the segments' results merged (Milvus's own design). A
batch goes as one `search` request of many queries (Milvus's batch search); one query per call is one request.
The database's folder holds the server's etcd and its segment files; once the rows are flushed and indexed it is
stopped and cached like PostgreSQL's.

Each row's filter keys are INT64 fields (`label`, `attribute`) with a scalar index each (STL_SORT, Milvus's index
for numbers); a filtered query is one search request with the boolean expression `column >= low and column < high`,
which Milvus evaluates into a bitset of the allowed rows before it searches each segment's vector index.
"""
from __future__ import annotations

import logging
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.errors import ImgretError, bad_value
from imgret.index.databases.base import Database, DatabaseMethod, GraphSettings
from imgret.index.filters import Where
from imgret.index.params import BUILD, QUERY, MethodParams, Param
from imgret.index.servers import ServerFailed, start_server

COLLECTION, VECTOR = "items", "vector"
KEY_COLUMNS = ("label", "attribute")
SOCKET_NAME = "milvus.sock"
INSERT_ROWS = 2000  # rows per insert request: far under the proxy's 64 MB message limit at any common width
BATCH_QUERIES = 1000  # queries per batch search request (Milvus allows up to 16,384)
TOOLS = ("unshare", "ip", "socat", "setpriv")
INDEX_WAIT_S = 3600.0
# Milvus 2.3 standalone's own stop does not finish (its query node waits on the root coordinator it stopped first);
# its launcher (the milvus package's MilvusServer.stop) sends SIGTERM and kills it a second later, as imgret does:
# what a run wrote is already durable by then (flushed segments, built indexes, etcd's log).
STOP_WAIT_S = 1.0
SESSION_TTL_S = 3


def binaries() -> Path:
    """The server's executable and libraries, unpacked once (the wheel ships them compressed) into the milvus
    package's own default folder, under a lock: concurrent runs unpack them once."""
    import milvus
    from filelock import FileLock

    base = Path(milvus.MilvusServerConfig.get_default_data_dir())
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / "unpack.lock")):
        milvus._initialize_data_files(str(base))  # skips files whose checksum matches what is unpacked
    return base / "bin"


class MilvusDatabase(Database):
    """A Milvus server in its own network namespace on the folder; `handle` is a client on its unix socket."""

    def _socket(self) -> str:
        return str(self.socket_dir(SOCKET_NAME, "imgret-milvus-") / SOCKET_NAME)

    def _client(self, timeout: float | None = None):
        return self.method.library().MilvusClient(uri=f"unix:{self._socket()}", timeout=timeout)

    def _answers(self) -> bool:
        """Whether the server answers through its socket yet (a client of its own, closed)."""
        client = self._client(timeout=2)
        try:
            return bool(client.get_server_version())
        finally:
            client.close()

    def open(self) -> None:
        import milvus

        config = milvus.MilvusServerConfig(data_dir=str(self.path))
        # a server killed at the end of the last run (STOP_WAIT_S) left its sessions in etcd: the next one starting
        # on the folder waits until they expire, which their time to live (30 s by default) bounds
        config.set("common.session.ttl", SESSION_TTL_S)
        config.resolve()  # the folder's configs/milvus.yaml: its etcd, segment and message-queue data in the folder
        port, executable, socket = int(config.get("proxy_port")), binaries() / "milvus", self._socket()
        tools = {tool: shutil.which(tool) for tool in TOOLS}
        forwarder = (f"{tools['setpriv']} --pdeathsig KILL -- {tools['socat']} "
                     f"UNIX-LISTEN:{shlex.quote(socket)},fork,unlink-early,mode=700 TCP:127.0.0.1:{port}")
        # the server reads configs/milvus.yaml from its working folder; the forwarder is its child (it dies with it)
        script = (f"cd {shlex.quote(str(self.path))} && {tools['ip']} link set lo up || exit 1; {forwarder} & "
                  f"exec {shlex.quote(str(executable))} run standalone")
        env = {"DEPLOY_MODE": "STANDALONE", "METRICS_PORT": "9091", "MILVUS_RUN_DIR": str(self.path / "run"),
               "LD_LIBRARY_PATH": str(executable.parent), "PATH": "/usr/bin:/bin"}
        self.server = start_server("Milvus", [tools["unshare"], "--net", "--", "sh", "-c", script],
                                   ready=self._answers,
                                   log_path=self.path / "milvus.log", stop_signal=signal.SIGTERM, timeout_s=120.0,
                                   env=env, stop_timeout_s=STOP_WAIT_S, graceful=False)
        self.handle = self._client()
        if self.handle.has_collection(COLLECTION):
            self.handle.load_collection(COLLECTION)

    def create(self, dim: int) -> None:
        self.open()
        library = self.method.library()
        schema = self.handle.create_schema(auto_id=False)
        schema.add_field("id", library.DataType.INT64, is_primary=True)
        schema.add_field(VECTOR, library.DataType.FLOAT_VECTOR, dim=int(dim))
        for column in KEY_COLUMNS:
            schema.add_field(column, library.DataType.INT64)
        self.handle.create_collection(COLLECTION, schema=schema)

    def make(self, gallery: np.ndarray, threads: int) -> None:
        """As every database makes itself; Milvus's refusal of a request (an insert, a flush, an index) is one line."""
        try:
            super().make(gallery, threads)
        except self.method.library().MilvusException as error:
            raise ServerFailed(f"Milvus refused to make the collection: {error}") from error

    def ingest(self, gallery: np.ndarray) -> None:
        labels, attributes = self.keys_column("label").tolist(), self.keys_column("attribute").tolist()
        for start in range(0, len(gallery), INSERT_ROWS):
            rows = gallery[start:start + INSERT_ROWS]
            self.handle.insert(COLLECTION, [{"id": start + offset, VECTOR: row.tolist(), "label": labels[start + offset],
                                             "attribute": attributes[start + offset]}
                                            for offset, row in enumerate(rows)])
        self.handle.flush(COLLECTION)  # seals the rows into segments, which is what Milvus indexes

    def create_index(self, threads: int) -> None:
        params = self.handle.prepare_index_params()
        params.add_index(VECTOR, index_type=self.method.index_type, metric_type="IP",
                         params=self.method.index_params(self.opts))
        for column in KEY_COLUMNS:
            params.add_index(column, index_type="STL_SORT")
        self.handle.create_index(COLLECTION, params)
        deadline = time.monotonic() + INDEX_WAIT_S
        while True:  # Milvus builds segments' indexes in the background: until every row is in one
            described = self.handle.describe_index(COLLECTION, VECTOR)
            if described["state"] == "Finished" and described["indexed_rows"] == described["total_rows"]:
                break
            if described["state"] == "Failed" or time.monotonic() > deadline:
                raise ServerFailed(f"Milvus could not create the index: {described}")
            time.sleep(0.2)
        self.handle.load_collection(COLLECTION)

    def shut(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        super().shut()  # SIGTERM, then SIGKILL as Milvus's own launcher stops it (STOP_WAIT_S)

    def connect(self) -> Any:
        try:
            return self._client()
        except self.method.library().MilvusException as error:  # a new client's session on a server gone away
            raise ServerFailed(f"Milvus stopped answering while the run searched it: {error}") from error

    def _search(self, session: Any, queries: list, k: int, setting: Mapping, condition: str = "") -> list:
        library = self.method.library()
        try:
            return session.search(COLLECTION, data=queries, limit=k, anns_field=VECTOR, filter=condition, search_params={
                "metric_type": "IP", "params": self.method.request_params(setting)})
        except library.MilvusException as error:  # the server was stopped or killed under the run
            raise ServerFailed(f"Milvus stopped answering while the run searched it: {error}") from error

    def query(self, session: Any, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        [hits] = self._search(session, [query.tolist()], k, setting)
        return [hit["id"] for hit in hits], [hit["distance"] for hit in hits]

    def filtered(self, session: Any, query: np.ndarray, k: int, setting: Mapping, where: Where) -> tuple[list, list]:
        [hits] = self._search(session, [query.tolist()], k, setting,
                              f"{where.column} >= {int(where.low)} and {where.column} < {int(where.high)}")
        return [hit["id"] for hit in hits], [hit["distance"] for hit in hits]

    def bare(self, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        """Batch search requests of many queries each, at this setting."""
        found = []
        for start in range(0, len(queries), BATCH_QUERIES):
            chunk = [query.tolist() for query in queries[start:start + BATCH_QUERIES]]
            found += [([hit["id"] for hit in hits], [hit["distance"] for hit in hits])
                      for hits in self._search(self.session(), chunk, k, setting)]
        return found


class Milvus(DatabaseMethod):
    module, also_needs, extra = "pymilvus", ("milvus",), "db"
    install = "pymilvus==2.6.17 milvus==2.3.5"
    query_path = "client API"
    database_type = MilvusDatabase
    filter_mode = "its own filter (a boolean expression on the stored keys, STL_SORT-indexed, before each segment's search)"
    ordering = "inner product (metric IP)"
    index_type = ""

    def library(self):
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise ImgretError(f"method {self.name} needs {', '.join(missing)} on PATH (Debian: apt-get install "
                              "socat util-linux iproute2): the server runs in a network namespace of its own")
        library = super().library()
        # pymilvus configures its own loggers when imported, and logs a traceback for every failed call, which imgret
        # turns into its one line (ServerFailed)
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
        return library

    def index_params(self, opts: MethodParams) -> dict:
        raise NotImplementedError

    def request_params(self, setting: Mapping) -> dict:
        raise NotImplementedError


class MilvusHnsw(GraphSettings, Milvus):
    name, label = "milvus_hnsw", "Milvus HNSW (client API)"
    index_type = "HNSW"
    # Milvus 2.3's bounds for HNSW (its docs): M 2..2048, efConstruction 1..2^31-1, ef k..32,768
    params = (Param("hnsw_m", BUILD, 2, maximum=2048, meaning="Milvus's M"),
              Param("ef_construction", BUILD, 1, maximum=2 ** 31 - 1, meaning="Milvus's efConstruction"),
              Param("ef_search", QUERY, top_level=True, maximum=32768, meaning="Milvus's ef"))

    def index_params(self, opts: MethodParams) -> dict:
        return {"M": int(opts["hnsw_m"]), "efConstruction": int(opts["ef_construction"])}

    def request_params(self, setting: Mapping) -> dict:
        return {"ef": int(setting["ef_search"])}


class MilvusIvfFlat(Milvus):
    name, label = "milvus_ivf", "Milvus IVF_FLAT (client API)"
    index_type = "IVF_FLAT"
    # Milvus 2.3's bounds for IVF_FLAT (its docs): nlist 1..65,536, nprobe 1..nlist
    params = (Param("nlist", BUILD, top_level=True, maximum=65536, meaning="Milvus's nlist"),
              Param("nprobe", QUERY, top_level=True, maximum=65536, meaning="Milvus's nprobe"))
    variant_param = "nprobe"

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        if gallery_size is not None and opts["nlist"] > gallery_size:
            raise bad_value("nlist", opts["nlist"], f"at most the gallery size ({gallery_size})")

    def invalid_combination(self, opts: MethodParams) -> str | None:
        if isinstance(opts.get("nprobe"), int) and isinstance(opts.get("nlist"), int) and opts["nprobe"] > opts["nlist"]:
            return f"nprobe={opts['nprobe']} > nlist={opts['nlist']}"
        return None

    def index_params(self, opts: MethodParams) -> dict:
        return {"nlist": int(opts["nlist"])}

    def request_params(self, setting: Mapping) -> dict:
        return {"nprobe": int(setting["nprobe"])}


METHODS = (MilvusHnsw(), MilvusIvfFlat())
