"""LanceDB (embedded, on disk: the Lance columnar format), its vector indexes with distance type "dot" (distance
1 - a·b: the inner product's order), searched through its client API (`table.search(query)...limit(k)`):

- `lancedb`: IVF_PQ, product-quantised codes per partition, `nprobes` partitions visited, then `refine_factor`
  times k candidates re-ranked on the full vectors read from disk (0: no re-ranking, the PQ distances' order).
- `lancedb_hnsw_sq`: IVF_HNSW_SQ, an HNSW graph over scalar-quantised rows in each partition, `ef` its candidate
  list.

Each row's filter keys are columns (`label`, `attribute`) with a scalar (B-tree) index each; a filtered query is
the same request with `.where("column >= low AND column < high", prefilter=True)`: LanceDB finds the allowed rows
first and searches the vector index among them only.

Lance sizes its own thread pools (its Rust runtime): `threads` does not bound its builds.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from imgret.errors import bad_value
from imgret.index.base import ADD_CHUNK_ROWS
from imgret.index.databases.base import Database, DatabaseMethod
from imgret.index.filters import Where
from imgret.index.params import BUILD, QUERY, MethodParams, Param, hnsw_params

TABLE = "items"


class LanceDatabase(Database):
    """A Lance table in the folder; its index and its request (the method's: IVF_PQ or IVF_HNSW_SQ)."""

    def create(self, dim: int) -> None:
        self.handle = self.method.library().connect(str(self.path / "lance"))

    def ingest(self, gallery: np.ndarray) -> None:
        import pyarrow as pa

        dim = gallery.shape[1]
        schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim)), ("label", pa.int64()),
                            ("attribute", pa.int64())])
        labels, attributes = self.keys_column("label"), self.keys_column("attribute")

        def batches():
            for start in range(0, len(gallery), ADD_CHUNK_ROWS):
                rows = gallery[start:start + ADD_CHUNK_ROWS]
                yield pa.record_batch([pa.array(np.arange(start, start + len(rows)), pa.int64()),
                                       pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), dim),
                                       pa.array(labels[start:start + len(rows)], pa.int64()),
                                       pa.array(attributes[start:start + len(rows)], pa.int64())], schema=schema)

        self.handle.create_table(TABLE, data=pa.RecordBatchReader.from_batches(schema, batches()))

    def create_index(self, threads: int) -> None:
        table = self.handle.open_table(TABLE)
        table.create_index("vector", config=self.method.index_config(self.opts))
        for column in ("label", "attribute"):  # what a prefilter reads its allowed rows from
            table.create_scalar_index(column, index_type="BTREE")

    def open(self) -> None:
        self.handle = self.method.library().connect(str(self.path / "lance"))

    def shut(self) -> None:
        self.handle = None  # Lance's files are complete once written: nothing to flush

    def connect(self) -> Any:
        return self.handle.open_table(TABLE)

    def disconnect(self, session: Any) -> None:
        pass

    def query(self, session: Any, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        return answer(self.method.request(session, query, k, setting))

    def filtered(self, session: Any, query: np.ndarray, k: int, setting: Mapping, where: Where) -> tuple[list, list]:
        condition = f"{where.column} >= {int(where.low)} AND {where.column} < {int(where.high)}"
        return answer(self.method.request(session, query, k, setting).where(condition, prefilter=True))

    def bare(self, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        """One call for a batch (its rows tagged with `query_index`); one query alone as a client sends it."""
        if len(queries) == 1:
            return [self.query(self.session(), queries[0], k, setting)]
        found = self.method.request(self.session(), queries, k, setting).to_arrow()
        which, ids, distances = (found[name].to_numpy() for name in ("query_index", "id", "_distance"))
        order = np.argsort(which, kind="stable")  # each query's rows together, in the order Lance ranked them
        bounds = np.cumsum(np.bincount(which, minlength=len(queries)))[:-1]
        return list(zip(np.split(ids[order], bounds), np.split(1 - distances[order], bounds)))


def answer(request) -> tuple[list, list]:
    """One query's (ids, cosines) from its request."""
    found = request.to_arrow()
    return found["id"].to_pylist(), [1 - value for value in found["_distance"].to_pylist()]


class Lance(DatabaseMethod):
    module, extra, install = "lancedb", "db", "lancedb==0.40.0"
    filter_mode = "its own filter (a prefilter on the stored keys, B-tree indexed, then the vector index's search)"
    query_path = "client API"
    database_type = LanceDatabase
    partitions, nprobes = Param("num_partitions", BUILD), Param("nprobes", QUERY, top_level=True)

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        if gallery_size is not None and opts["num_partitions"] > gallery_size:
            raise bad_value("method.num_partitions", opts["num_partitions"], f"at most the gallery size ({gallery_size})")

    def invalid_combination(self, opts: MethodParams) -> str | None:
        if isinstance(opts.get("nprobes"), int) and isinstance(opts.get("num_partitions"), int) \
                and opts["nprobes"] > opts["num_partitions"]:
            return f"nprobes={opts['nprobes']} > num_partitions={opts['num_partitions']}"
        return None

    def index_config(self, opts: MethodParams):
        raise NotImplementedError

    def request(self, session: Any, query: np.ndarray, k: int, setting: Mapping):
        """The engine's query builder for one query (or a batch) at this setting."""
        return (session.search(query).distance_type("dot").nprobes(int(setting["nprobes"])).limit(k)
                .select(["id", "_distance"]))


class LanceIvfPq(Lance):
    name, label = "lancedb", "LanceDB IVF_PQ (client API)"
    params = (Lance.partitions, Param("num_sub_vectors", BUILD, optional=True), Lance.nprobes,
              Param("refine_factor", QUERY, minimum=0, top_level=True))
    variant_param = "nprobes"
    ordering = "inner product (distance type 'dot', 1 - a·b), re-ranked on the full rows when refine_factor > 0"
    reranks_itself = True  # refine_factor is LanceDB's own

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        if dim is not None and opts["num_sub_vectors"] is not None and dim % opts["num_sub_vectors"]:
            raise bad_value("method.num_sub_vectors", opts["num_sub_vectors"], f"a divisor of the dimension ({dim})")

    def index_config(self, opts: MethodParams):
        from lancedb.index import IvfPq

        sub_vectors = opts["num_sub_vectors"]  # None: LanceDB's own choice (the dimension / 16, else / 8)
        return IvfPq(distance_type="dot", num_partitions=int(opts["num_partitions"]),
                     num_sub_vectors=None if sub_vectors is None else int(sub_vectors))

    def request(self, session: Any, query: np.ndarray, k: int, setting: Mapping):
        search = super().request(session, query, k, setting)
        return search.refine_factor(int(setting["refine_factor"])) if setting.get("refine_factor") else search


class LanceHnswSq(Lance):
    name, label = "lancedb_hnsw_sq", "LanceDB IVF_HNSW_SQ (client API)"
    params = (Lance.partitions, *hnsw_params()[:2], Lance.nprobes, Param("ef", QUERY, top_level=True))
    variant_param = "ef"
    ordering = "inner product (distance type 'dot', 1 - a·b, on scalar-quantised rows)"
    scores_on = "scalar-quantised rows"
    recall_bound = "scalar-quantised rows ranked without re-ranking"

    def check_k(self, opts: MethodParams, k: int) -> None:
        if opts["ef"] < k:
            raise bad_value("ef", opts["ef"], f"at least k ({k})")

    def index_config(self, opts: MethodParams):
        from lancedb.index import HnswSq

        return HnswSq(distance_type="dot", num_partitions=int(opts["num_partitions"]), m=int(opts["hnsw_m"]),
                      ef_construction=int(opts["ef_construction"]))

    def request(self, session: Any, query: np.ndarray, k: int, setting: Mapping):
        return super().request(session, query, k, setting).ef(int(setting["ef"]))


METHODS = (LanceIvfPq(), LanceHnswSq())
