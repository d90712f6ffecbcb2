"""Chroma (embedded `PersistentClient`: SQLite for records, an HNSW segment on disk), a collection with space "ip"
(distance 1 - a·b: the inner product's order) and no embedding function (the rows are given; its default one
would download a model), searched through its client API (`collection.query`).

Chroma grows its HNSW graph while rows are added: its ingest time includes most of the graph's construction, and
its index creation is the final flush. `ef_search` is a setting of the collection, read when the collection is
opened (a `modify` alone leaves an open collection at its old value): another setting is stored, then the
collection opened again, while searches at the current one wait (the index's gate).

Each row's filter keys are its metadata (`label`, `attribute`); a filtered query passes `where={"$and": [{column:
{"$gte": low}}, {column: {"$lt": high}}]}`, which Chroma applies to the metadata first and then searches the graph
among the rows it allows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from imgret.index.databases.base import Database, DatabaseMethod, GraphSettings
from imgret.index.filters import Where

COLLECTION = "items"


@dataclass(eq=False)
class ChromaDatabase(Database):
    client: Any = None  # the persistent client whose collection `handle` is
    applied: dict | None = None  # the query setting the collection's configuration holds

    def _client(self):
        from chromadb.config import Settings

        return self.method.library().PersistentClient(path=str(self.path / "chroma"),
                                                      settings=Settings(anonymized_telemetry=False))

    def create(self, dim: int) -> None:
        self.client = self._client()
        self.handle = self.client.create_collection(COLLECTION, embedding_function=None, configuration={"hnsw": {
            "space": "ip", "max_neighbors": int(self.opts["hnsw_m"]),
            "ef_construction": int(self.opts["ef_construction"]), "ef_search": int(self.opts["ef_search"])}})
        self.applied = {"ef_search": int(self.opts["ef_search"])}

    def ingest(self, gallery: np.ndarray) -> None:
        batch = self.client.get_max_batch_size()
        labels, attributes = self.keys_column("label").tolist(), self.keys_column("attribute").tolist()
        for start in range(0, len(gallery), batch):
            rows = gallery[start:start + batch]
            numbers = range(start, start + len(rows))
            self.handle.add(ids=[str(row) for row in numbers], embeddings=rows,
                            metadatas=[{"label": labels[row], "attribute": attributes[row]} for row in numbers])

    def create_index(self, threads: int) -> None:
        self.handle.count()  # the last rows applied to the graph

    def open(self) -> None:
        self.client = self._client()
        self.handle = self.client.get_collection(COLLECTION, embedding_function=None)
        self.applied = {"ef_search": self.handle.configuration["hnsw"]["ef_search"]}

    def shut(self) -> None:
        if self.handle is not None:
            self.client.clear_system_cache()  # its files closed, so the folder can be packed or removed
            self.handle = self.client = None

    def disconnect(self, session: Any) -> None:
        pass

    def _apply(self, setting: Mapping) -> None:
        if self.applied != {"ef_search": int(setting["ef_search"])}:
            self.handle.modify(configuration={"hnsw": {"ef_search": int(setting["ef_search"])}})
            self.shut()
            self.open()

    def bare(self, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        """One call for the batch, at a setting the collection holds."""
        self._apply(setting)
        return self.handle.query(query_embeddings=queries, n_results=k, include=["distances"])

    def filtered(self, session: Any, query: np.ndarray, k: int, setting: Mapping, where: Where) -> tuple[list, list]:
        self._apply(setting)
        found = self.handle.query(query_embeddings=query[None], n_results=k, include=["distances"], where={
            "$and": [{where.column: {"$gte": where.low}}, {where.column: {"$lt": where.high}}]})
        return [int(row) for row in found["ids"][0]], [1 - value for value in found["distances"][0]]


class Chroma(GraphSettings, DatabaseMethod):
    name, label = "chroma", "Chroma HNSW (client API)"
    module, extra, install = "chromadb", "db", "chromadb==1.5.9"
    query_path = "client API"
    database_type = ChromaDatabase
    filter_mode = "its own filter (where= on the stored metadata, applied before the graph's search)"
    ordering = "inner product (space 'ip', distance 1 - a·b)"

    def results(self, found, k: int):
        ids = [[int(row) for row in rows] for rows in found["ids"]]
        return super().results([(rows, [1 - value for value in distances])
                                for rows, distances in zip(ids, found["distances"])], k)


METHODS = (Chroma(),)
