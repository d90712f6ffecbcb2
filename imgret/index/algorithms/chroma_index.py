"""Chroma (embedded `PersistentClient`: SQLite for records, an HNSW segment on disk), a collection with space "ip"
(distance 1 - a·b: the inner product's order) and no embedding function (the rows are given; its default one
would download a model), searched through its client API (`collection.query`).

Chroma grows its HNSW graph while rows are added: its ingest time includes most of the graph's construction, and
its index creation is the final flush. `ef_search` is a setting of the collection, read when the collection is
opened (a `modify` alone leaves an open collection at its old value): another setting is stored, then the
collection opened again, while searches at the current one wait (the index's gate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, TYPE_CHECKING

import numpy as np

from imgret.index.databases import Database, DatabaseMethod, GraphSettings

if TYPE_CHECKING:  # annotations only: imgret.index.methods imports the index package
    from imgret.index.methods import MethodSettings

COLLECTION = "items"


@dataclass
class ChromaDatabase(Database):
    client: Any = None  # the persistent client whose collection `handle` is
    applied: dict | None = None  # the query setting the collection's configuration holds


class Chroma(GraphSettings, DatabaseMethod):
    name, label = "chroma", "Chroma HNSW (client API)"
    module, extra, install = "chromadb", "db", "chromadb==1.5.9"
    query_path = "client API"
    database_type = ChromaDatabase
    ordering = "inner product (space 'ip', distance 1 - a·b)"

    def _client(self, database: ChromaDatabase):
        from chromadb.config import Settings

        return self.library().PersistentClient(path=str(database.path / "chroma"),
                                               settings=Settings(anonymized_telemetry=False))

    def create_in(self, database: ChromaDatabase, opts: MethodSettings, dim: int) -> None:
        client = self._client(database)
        database.handle = client.create_collection(COLLECTION, embedding_function=None, configuration={"hnsw": {
            "space": "ip", "max_neighbors": int(opts["hnsw_m"]), "ef_construction": int(opts["ef_construction"]),
            "ef_search": int(opts["ef_search"])}})
        database.applied = {"ef_search": int(opts["ef_search"])}
        database.client = client

    def ingest(self, database: ChromaDatabase, gallery: np.ndarray) -> None:
        batch = database.client.get_max_batch_size()
        for start in range(0, len(gallery), batch):
            rows = gallery[start:start + batch]
            database.handle.add(ids=[str(row) for row in range(start, start + len(rows))], embeddings=rows)

    def create_index(self, database: ChromaDatabase, opts: MethodSettings, threads: int) -> None:
        database.handle.count()  # the last rows applied to the graph

    def open(self, database: ChromaDatabase, opts: MethodSettings) -> None:
        database.client = self._client(database)
        database.handle = database.client.get_collection(COLLECTION, embedding_function=None)
        database.applied = {"ef_search": database.handle.configuration["hnsw"]["ef_search"]}

    def shut(self, database: ChromaDatabase) -> None:
        if database.handle is not None:
            database.client.clear_system_cache()  # its files closed, so the folder can be packed or removed
            database.handle = database.client = None

    def disconnect(self, session: Any) -> None:
        pass

    def _apply(self, database: ChromaDatabase, setting: Mapping) -> None:
        if database.applied != {"ef_search": int(setting["ef_search"])}:
            database.handle.modify(configuration={"hnsw": {"ef_search": int(setting["ef_search"])}})
            self.shut(database)
            self.open(database, database.opts)

    def bare(self, native: ChromaDatabase, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        self._apply(native, setting)
        return native.handle.query(query_embeddings=queries, n_results=k, include=["distances"])

    def results(self, found, k: int):
        ids = [[int(row) for row in rows] for rows in found["ids"]]
        return super().results([(rows, [1 - value for value in distances])
                                for rows, distances in zip(ids, found["distances"])], k)


METHODS = (Chroma(),)
