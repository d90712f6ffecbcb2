"""sqlite-vec: a `vec0` virtual table in an SQLite file (float32 vectors, `distance_metric=cosine`), searched in SQL by
its KNN query (`WHERE embedding MATCH ? AND k = ? ORDER BY distance`): an exact scan of every row, sqlite-vec having
no approximate index in 0.1.9. The extension is loaded through APSW, since the `sqlite3` module of many Python
builds cannot load extensions. Each searching thread holds its own connection.

Each row's filter keys are vec0 metadata columns (`label`, `attribute`); a filtered query adds `AND column >= ? AND
column < ?` to the KNN query, which sqlite-vec applies inside its scan.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from imgret.index.databases.base import Database, DatabaseMethod
from imgret.index.filters import Where

FILE = "vectors.sqlite"
SQL = "SELECT rowid, distance FROM items WHERE embedding MATCH ? AND k = ? ORDER BY distance"
FILTERED_SQL = {column: f"SELECT rowid, distance FROM items WHERE embedding MATCH ? AND k = ? AND {column} >= ? AND "
                        f"{column} < ? ORDER BY distance" for column in ("label", "attribute")}
INSERT_ROWS = 4096


class SqliteVecDatabase(Database):
    """An SQLite file in the folder with the `items` vec0 table; `handle` is the connection that made or opened it."""

    def connect(self) -> Any:
        import sqlite_vec

        connection = self.method.library().Connection(str(self.path / FILE))
        connection.enable_load_extension(True)
        connection.load_extension(sqlite_vec.loadable_path())
        connection.enable_load_extension(False)
        return connection

    def create(self, dim: int) -> None:
        self.handle = self.connect()
        self.handle.execute(f"CREATE VIRTUAL TABLE items USING vec0(embedding float[{int(dim)}] distance_metric=cosine, "
                            "label integer, attribute integer)")

    def ingest(self, gallery: np.ndarray) -> None:
        labels, attributes = self.keys_column("label").tolist(), self.keys_column("attribute").tolist()
        for start in range(0, len(gallery), INSERT_ROWS):
            with self.handle:  # one transaction a chunk
                self.handle.executemany("INSERT INTO items(rowid, embedding, label, attribute) VALUES (?, ?, ?, ?)",
                                        ((start + offset, row.tobytes(), labels[start + offset], attributes[start + offset])
                                         for offset, row in enumerate(gallery[start:start + INSERT_ROWS])))

    def create_index(self, threads: int) -> None:
        pass  # nothing beyond the table: sqlite-vec scans it

    def open(self) -> None:
        self.handle = self.connect()

    def shut(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def query(self, session: Any, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        rows = session.execute(SQL, (query.tobytes(), k)).fetchall()
        return [row[0] for row in rows], [1.0 - row[1] for row in rows]

    def filtered(self, session: Any, query: np.ndarray, k: int, setting: Mapping, where: Where) -> tuple[list, list]:
        rows = session.execute(FILTERED_SQL[where.column], (query.tobytes(), k, where.low, where.high)).fetchall()
        return [row[0] for row in rows], [1.0 - row[1] for row in rows]


class SqliteVec(DatabaseMethod):
    name, label = "sqlite_vec", "sqlite-vec exact (SQL)"
    module, also_needs, extra = "apsw", ("sqlite_vec",), "db"
    install = "apsw==3.54.1.0 sqlite-vec==0.1.9"
    database_type = SqliteVecDatabase
    exact = True
    filter_mode = "its own filter (SQL conditions on vec0 metadata columns, inside its exact scan)"
    ordering = "cosine (distance_metric=cosine, distance 1 - cos)"


METHODS = (SqliteVec(),)
