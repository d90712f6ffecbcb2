"""Qdrant through `qdrant-edge-py`: Qdrant's own Rust storage and search engine, in process (an `EdgeShard` in a
folder: segments, a write-ahead log, HNSW graphs), vectors with distance Dot (the inner product on the store's unit
rows), searched through its query API, one `query_batch` for the batch (Qdrant's batch search: one planned pass
over the segments for all of its requests).

- `qdrant`: each segment's HNSW graph (`m`, `ef_construct`), searched with `hnsw_ef` per request. Qdrant leaves
  segments under its indexing threshold (10,000 KB by default) unindexed and scans them exactly; imgret sets both
  thresholds to 1 KB so that the method is the HNSW graph at every gallery size (its defaults would scan every
  gallery under 10 MB exactly), and runs Qdrant's optimizer to completion when the rows are in (its index
  creation).
- `qdrant_exact`: the same shard searched with `exact=True`, Qdrant's full scan; no graph is built.

Each row's filter keys are its payload (`label`, `attribute`), each with an integer payload index made before the
graphs are built (Qdrant's advice: its graphs then add the links that keep filtered searches connected, and its
query planner can choose the payload index and an exact scan for a narrow filter); a filtered request carries
`Filter(must=[FieldCondition(column, range=RangeFloat(gte=low, lt=high))])`, one request per query in one batch.

`qdrant` keeps its rows quantised as Qdrant does where asked (`quantisation`: sq8, Qdrant's scalar Int8; pq, its
product quantisation at compression x16, its docs' example; binary, one bit a dimension), its graph searched on the
codes; `refine_factor` F > 1 turns on Qdrant's own rescoring of F x k candidates by the full vectors (`rescore`,
`oversampling`), 1 leaves it off, so that the codes' own recall is measured.

A shard splits its rows into segments (by default as many as the machine has cores) and searches them on its own
thread pool: `threads` does not bound it.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from imgret.index.base import ADD_CHUNK_ROWS
from imgret.index.databases.base import Database, DatabaseMethod, GraphSettings
from imgret.index.filters import Where
from imgret.index.params import QUANTISATION, REFINE

SHARD = "shard"
ALWAYS_INDEX_KB = 1  # segments above 1 KB get their graph, and no segment is scanned instead of searched
NEVER_INDEX_KB = 2 ** 40  # a threshold no segment reaches


class QdrantDatabase(Database):
    """An edge shard in the folder: `handle` is the open `EdgeShard`."""

    def _config(self, dim: int):
        edge = self.method.library()
        graph = edge.HnswIndexConfig(m=int(self.opts.get("hnsw_m", 16)),
                                     ef_construct=int(self.opts.get("ef_construction", 100)),
                                     full_scan_threshold=ALWAYS_INDEX_KB)
        # the exact method builds no graph: its optimizer never indexes
        indexing = NEVER_INDEX_KB if self.method.exact else ALWAYS_INDEX_KB
        return edge.EdgeConfig(vectors=edge.EdgeVectorParams(size=int(dim), distance=edge.Distance.Dot),
                               hnsw_config=graph, optimizers=edge.EdgeOptimizersConfig(indexing_threshold=indexing),
                               quantization_config=self._codes(edge))

    def _codes(self, edge):
        """The quantisation Qdrant keeps the rows in, or None (full precision)."""
        codes = self.method.codes(self.opts)
        if codes == "sq8":
            return edge.ScalarQuantizationConfig(type=edge.ScalarType.Int8)
        if codes == "pq":
            return edge.ProductQuantizationConfig(compression=edge.CompressionRatio.X16)
        if codes == "binary":
            return edge.BinaryQuantizationConfig()
        return None

    def create(self, dim: int) -> None:
        self.handle = self.method.library().EdgeShard.create(str(self.path / SHARD), self._config(dim))

    def ingest(self, gallery: np.ndarray) -> None:
        edge = self.method.library()
        for column in ("label", "attribute"):
            self.handle.update(edge.UpdateOperation.create_field_index(column, edge.PayloadSchemaType.Integer))
        labels, attributes = self.keys_column("label").tolist(), self.keys_column("attribute").tolist()
        for start in range(0, len(gallery), ADD_CHUNK_ROWS // 16):
            rows = gallery[start:start + ADD_CHUNK_ROWS // 16]
            self.handle.update(edge.UpdateOperation.upsert_points(
                [edge.Point(start + offset, row, {"label": labels[start + offset], "attribute": attributes[start + offset]})
                 for offset, row in enumerate(rows)]))

    def create_index(self, threads: int) -> None:
        self.handle.optimize()  # blocks until Qdrant's optimizers have nothing left to do (graphs built)

    def open(self) -> None:
        self.handle = self.method.library().EdgeShard.load(str(self.path / SHARD))

    def shut(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            self.handle.close()
            self.handle = None

    def disconnect(self, session: Any) -> None:
        pass

    def _rescoring(self, edge, setting: Mapping):
        """Qdrant's own rescoring of a quantised shard: on with F x k candidates where refine_factor F > 1, off at 1
        (the codes' own order); nothing for full-precision rows."""
        if self.method.codes(self.opts) == "none":
            return None
        factor = int(setting.get("refine_factor") or 1)
        return edge.QuantizationSearchParams(rescore=factor > 1, oversampling=float(factor) if factor > 1 else None)

    def bare(self, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        """One batch request for the queries, each at this setting."""
        return self._batch(queries, k, setting, [None] * len(queries))

    def bare_filtered(self, queries: np.ndarray, k: int, setting: Mapping, threads: int, wheres: list[Where]):
        """One batch request, each query under its own payload filter."""
        return [([point.id for point in points], [point.score for point in points])
                for points in self._batch(queries, k, setting, wheres)]

    def _batch(self, queries: np.ndarray, k: int, setting: Mapping, wheres: list[Where | None]):
        edge = self.method.library()
        params = (edge.SearchParams(hnsw_ef=int(setting["ef_search"]), quantization=self._rescoring(edge, setting))
                  if "ef_search" in setting else edge.SearchParams(exact=True))

        def condition(where: Where | None):
            return None if where is None else edge.Filter(must=[edge.FieldCondition(
                where.column, range=edge.RangeFloat(gte=where.low, lt=where.high))])

        return self.handle.query_batch(edge.QueryBatchRequest(
            [edge.QueryRequest(limit=k, query=edge.Query.Nearest(query), params=params, filter=condition(where))
             for query, where in zip(queries, wheres)]))


class Qdrant(DatabaseMethod):
    module, extra, install = "qdrant_edge", "db", "qdrant-edge-py==0.9.0"
    query_path = "client API"
    database_type = QdrantDatabase
    filter_mode = "its own filter (a payload filter on the stored keys, integer-indexed, in Qdrant's own planning)"
    ordering = "inner product (distance Dot)"

    def results(self, found, k: int):
        return super().results([([point.id for point in points], [point.score for point in points])
                                for points in found], k)


class QdrantHnsw(GraphSettings, Qdrant):
    name, label = "qdrant", "Qdrant HNSW (edge, client API)"
    params = (*GraphSettings.params, QUANTISATION, REFINE)
    quantisations = {"none": "none", "sq8": "scalar Int8", "pq": "product x16", "binary": "binary"}
    reranks_itself = True  # refine_factor is Qdrant's own rescoring (oversampling)


class QdrantExact(Qdrant):
    name, label = "qdrant_exact", "Qdrant exact (edge, client API)"
    exact = True


METHODS = (QdrantHnsw(), QdrantExact())
