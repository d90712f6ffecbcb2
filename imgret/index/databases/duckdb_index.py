"""DuckDB's vss extension: an HNSW index (USearch inside DuckDB) over a FLOAT[dim] column, metric 'ip', searched in
SQL by `ORDER BY array_negative_inner_product(embedding, query) LIMIT k` (the plan's HNSW_INDEX_SCAN, and nothing else:
late materialization is turned off, below). Embedded: the
database is one file, opened in this process. The extension comes from the `duckdb-ext-vss` wheel (no download at
run time: `INSTALL vss` fetches from the internet), which matches exactly one DuckDB release, hence DuckDB's pin.

Each row's filter keys are columns (`label`, `attribute`); a filtered query adds `WHERE column >= low AND column <
high` to the same SQL, and DuckDB plans it as it will (a run records the plan, `EXPLAIN`, for a sample of queries):
vss 1.4's HNSW index scan returns the LIMIT's k rows and DuckDB filters those (FILTER over HNSW_INDEX_SCAN), so a
filtered query returns what the condition allows of the unfiltered top k: what a DuckDB user writing WHERE gets.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import ADD_CHUNK_ROWS
from imgret.index.databases.base import Database, DatabaseMethod, GraphSettings
from imgret.index.filters import Where

DATABASE_FILE = "vectors.duckdb"


def extension_directory() -> Path:
    return Path(importlib.util.find_spec("duckdb_ext").submodule_search_locations[0]) / "extensions"


@dataclass(eq=False)
class DuckdbDatabase(Database):
    read_only: bool = False  # `handle` opened read-only (a database from the cache): nothing to write out
    dim: int = 0  # the rows' width, which its SQL names

    def _connect(self, read_only: bool):
        connection = self.method.library().connect(str(self.path / DATABASE_FILE), read_only=read_only, config={
            "extension_directory": str(extension_directory()), "autoinstall_known_extensions": False,
            "autoload_known_extensions": False})
        connection.execute("LOAD vss")
        return without_late_materialization(connection)

    def create(self, dim: int) -> None:
        self.handle, self.read_only = self._connect(read_only=False), False
        self.handle.execute("SET hnsw_enable_experimental_persistence = true")  # the index saved with the file
        self.handle.execute(f"CREATE TABLE items (id INTEGER, embedding FLOAT[{int(dim)}], label INTEGER, "
                            "attribute INTEGER)")
        self.dim = int(dim)

    def ingest(self, gallery: np.ndarray) -> None:
        import pyarrow as pa

        dim = gallery.shape[1]
        labels, attributes = self.keys_column("label"), self.keys_column("attribute")
        for start in range(0, len(gallery), ADD_CHUNK_ROWS):
            rows = gallery[start:start + ADD_CHUNK_ROWS]
            chunk = pa.table({"id": pa.array(np.arange(start, start + len(rows)), pa.int32()),
                              "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), dim),
                              "label": pa.array(labels[start:start + len(rows)], pa.int32()),
                              "attribute": pa.array(attributes[start:start + len(rows)], pa.int32())})
            self.handle.register("chunk", chunk)
            self.handle.execute("INSERT INTO items SELECT id, embedding, label, attribute FROM chunk")
            self.handle.unregister("chunk")

    def create_index(self, threads: int) -> None:
        self.handle.execute(f"SET threads = {int(threads)}")
        self.handle.execute(f"CREATE INDEX items_hnsw ON items USING HNSW (embedding) WITH (metric = 'ip', "
                            f"M = {int(self.opts['hnsw_m'])}, ef_construction = {int(self.opts['ef_construction'])})")

    def open(self) -> None:
        self.handle, self.read_only = self._connect(read_only=True), True
        self.dim = int(self.handle.execute("SELECT array_length(embedding) FROM items LIMIT 1").fetchone()[0])

    def shut(self) -> None:
        if self.handle is not None:
            if not self.read_only:
                self.handle.execute("CHECKPOINT")  # the table and its index written into the file
            self.handle.close()
            self.handle = None

    def connect(self) -> Session:
        # a connection of its own to the same database, for one thread
        return Session(without_late_materialization(self.handle.cursor()), sql(self.dim))

    def disconnect(self, session: Session) -> None:
        session.connection.close()

    def query(self, session: Session, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        session.apply(setting)
        rows = session.connection.execute(session.sql, {"query": query.tolist(), "k": k}).fetchall()
        return [row[0] for row in rows], [-row[1] for row in rows]

    def filtered(self, session: Session, query: np.ndarray, k: int, setting: Mapping, where: Where) -> tuple[list, list]:
        session.apply(setting)
        rows = session.connection.execute(sql(self.dim, where.column), {
            "query": query.tolist(), "k": k, "low": where.low, "high": where.high}).fetchall()
        return [row[0] for row in rows], [-row[1] for row in rows]

    def plan(self, query: np.ndarray, k: int, setting: Mapping, where: Where) -> str | None:
        session = self.session()
        session.apply(setting)
        explained = session.connection.execute(f"EXPLAIN {sql(self.dim, where.column)}", {
            "query": query.tolist(), "k": k, "low": where.low, "high": where.high}).fetchall()
        text = "\n".join(str(part) for row in explained for part in row)
        operators = re.findall(r"\b(HNSW_INDEX_SCAN|SEQ_SCAN|TABLE_SCAN|TOP_N|ORDER_BY|FILTER|HASH_JOIN|PROJECTION)\b",
                               text)
        return " > ".join(dict.fromkeys(operators)) or None


class DuckdbHnsw(GraphSettings, DatabaseMethod):
    name, label = "duckdb_hnsw", "DuckDB vss HNSW (SQL)"
    filter_mode = "its own filter (SQL WHERE on the stored keys, as DuckDB plans it: filter_plan)"
    filter_recall_bound = ("DuckDB's vss applies a WHERE to the k rows its HNSW index scan returns (EXPLAIN: FILTER "
                           "over HNSW_INDEX_SCAN), so a filtered query returns the allowed ones of those, often fewer "
                           "than k")
    module, also_needs, extra = "duckdb", ("duckdb_ext",), "db"
    install = "duckdb-ext-vss==1.4.4.20260205 duckdb==1.4.4"  # the last names the version its figures give
    database_type = DuckdbDatabase
    ordering = "inner product (metric 'ip', ORDER BY array_negative_inner_product)"


def without_late_materialization(connection):
    """DuckDB's late materialization rewrites ORDER BY distance LIMIT k as the HNSW index scan's row ids joined back
    to a sequential scan of the whole table (EXPLAIN: HASH_JOIN over SEQ_SCAN beside HNSW_INDEX_SCAN), so that every
    query read every row; without it the plan is the index scan alone, and the rows found are the same (ranked by the
    index's own distances). A setting of the connection: each cursor gets it too."""
    connection.execute("SET late_materialization_max_rows = 0")
    return connection


def sql(dim: int, column: str | None = None) -> str:
    """The query's SQL; with `column`, under the condition low <= column < high."""
    distance = f"array_negative_inner_product(embedding, $query::FLOAT[{dim}])"
    where = "" if column is None else f" WHERE {column} >= $low AND {column} < $high"
    return f"SELECT id, {distance} FROM items{where} ORDER BY {distance} LIMIT $k"


@dataclass
class Session:
    """One thread's cursor, its query's SQL, and the search list it last set."""

    connection: Any
    sql: str
    applied: dict | None = None

    def apply(self, setting: Mapping) -> None:
        if self.applied != setting:
            self.connection.execute(f"SET hnsw_ef_search = {int(setting['ef_search'])}")
            self.applied = dict(setting)


METHODS = (DuckdbHnsw(),)
