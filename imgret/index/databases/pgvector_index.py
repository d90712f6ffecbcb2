"""pgvector in a real PostgreSQL server: the PostgreSQL 16 and pgvector 0.6 that the `pgserver` wheel carries,
started by imgret for the run on a unix socket only (no TCP), as `nobody` when imgret runs as root (PostgreSQL
refuses root). Rows are ingested with COPY in binary; the index is HNSW or IVFFlat with `vector_ip_ops`, searched by
`ORDER BY embedding <#> query LIMIT k` (negative inner product: the inner product's order), one SQL query per
query vector, each client on its own connection.

Each row's filter keys are columns (`label`, `attribute`) with a B-tree index each; a filtered query is the same
query with `WHERE column >= low AND column < high`, and PostgreSQL's planner chooses how to run it: the vector index
(its ef_search or probes candidates, then the condition: it may return fewer than k) or the condition's B-tree and
an exact sort of the rows it keeps. A run records the plans it chose (`EXPLAIN`) for a sample of the queries.
"""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.errors import bad_value
from imgret.index.folders import new_folder
from imgret.index.databases.base import Database, DatabaseMethod
from imgret.index.filters import Where
from imgret.index.params import BUILD, QUERY, SERVER, MethodParams, Param, hnsw_params
from imgret.index.servers import ServerFailed, hand_over, last_lines, start_server, unprivileged

SOCKET_NAME = ".s.PGSQL.5432"
SQL = "SELECT id, embedding <#> %(query)s FROM items ORDER BY embedding <#> %(query)s LIMIT %(k)s"
FILTERED_SQL = {column: f"SELECT id, embedding <#> %(query)s FROM items WHERE {column} >= %(low)s AND {column} < "
                        f"%(high)s ORDER BY embedding <#> %(query)s LIMIT %(k)s" for column in ("label", "attribute")}


def psycopg():
    import psycopg

    return psycopg


def postgres_bin() -> Path:
    return Path(importlib.util.find_spec("pgserver").submodule_search_locations[0]) / "pginstall" / "bin"


def reachable_by(folder: Path, uid: int) -> bool:
    """Whether the user `uid` may enter `folder` (every folder above it searchable by others, or theirs)."""
    for step in (folder.resolve(), *folder.resolve().parents):
        mode = step.stat()
        if not (mode.st_mode & 0o001 or mode.st_uid == uid):
            return False
    return True


@dataclass
class Session:
    """One thread's connection, and the query setting it last set."""

    connection: Any
    applied: dict | None = None

    def apply(self, setting: Mapping, statement: str) -> None:
        """`statement` (a SET of the method's knob) where the session holds another setting."""
        if self.applied != setting:
            self.connection.execute(statement)
            self.applied = dict(setting)


@dataclass(eq=False)
class PostgresDatabase(Database):
    """A PostgreSQL cluster in the folder, its server on a unix socket, the table and the method's index."""

    def create(self, dim: int) -> None:
        owner = unprivileged()
        pgdata = self.path / "pgdata"
        pgdata.mkdir()
        hand_over(self.path, owner)
        done = subprocess.run([postgres_bin() / "initdb", "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                               "--encoding=UTF8", "--no-instructions"], capture_output=True, text=True,
                              user=owner[0] if owner else None, group=owner[1] if owner else None)
        if done.returncode != 0:
            raise ServerFailed(f"PostgreSQL's initdb failed (exit {done.returncode}): "
                               f"{' | '.join(done.stderr.strip().splitlines()[-3:])}")
        self.open()
        with psycopg().connect(**self._address(), autocommit=True) as connection:
            connection.execute("CREATE EXTENSION vector")
            connection.execute(f"CREATE TABLE items (id integer PRIMARY KEY, embedding vector({int(dim)}), "
                               "label integer, attribute integer)")

    def _address(self) -> dict:
        return {"host": str(self.socket_dir(SOCKET_NAME, "imgret-pg-", unprivileged())), "user": "postgres",
                "dbname": "postgres"}

    def open(self) -> None:
        owner = unprivileged()
        hand_over(self.path, owner)
        (self.path / "pgdata").chmod(0o700)
        address = self._address()
        self.server = start_server(
            "PostgreSQL", [postgres_bin() / "postgres", "-D", self.path / "pgdata", "-k", address["host"],
                           "-c", "listen_addresses=", "-c", f"shared_buffers={self.opts.get('shared_buffers', '128MB')}",
                           "-c", f"maintenance_work_mem={self.opts.get('maintenance_work_mem', '64MB')}"],
            ready=lambda: psycopg().connect(**address, connect_timeout=2).close() is None,
            log_path=self.path / "postgres.log", stop_signal=signal.SIGINT, as_user=owner)

    def connect(self) -> Session:
        connection = psycopg().connect(**self._address(), autocommit=True)
        self.method.library().register_vector(connection)
        return Session(connection)

    def disconnect(self, session: Session) -> None:
        session.connection.close()

    def ingest(self, gallery: np.ndarray) -> None:
        with self.session().connection.cursor() as cursor:
            labels, attributes = self.keys_column("label").tolist(), self.keys_column("attribute").tolist()
            with cursor.copy("COPY items (id, embedding, label, attribute) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "vector", "int4", "int4"])
                for row, vector in enumerate(gallery):
                    copy.write_row((row, vector, labels[row], attributes[row]))
            cursor.execute("ANALYZE items")

    def create_index(self, threads: int) -> None:
        connection = self.session().connection
        connection.execute(f"SET max_parallel_maintenance_workers = {max(threads - 1, 0)}")
        try:
            connection.execute(self.method.index_sql(self.opts))
            for column in ("label", "attribute"):  # what a filtered query's condition can use instead
                connection.execute(f"CREATE INDEX ON items ({column})")
        except psycopg().Error as error:
            raise ServerFailed(f"PostgreSQL could not create the index: {str(error).strip().splitlines()[0]} "
                               f"(log: {last_lines(self.path / 'postgres.log')})") from error

    def query(self, session: Session, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        return self._fetch(session, SQL, setting, {"query": query, "k": k})

    def _fetch(self, session: Session, sql: str, setting: Mapping, values: dict) -> tuple[list, list]:
        try:
            session.apply(setting, f"SET {self.method.knob} = {int(setting[self.method.query_key])}")
            rows = session.connection.execute(sql, values, binary=True).fetchall()
        except psycopg().OperationalError as error:  # the server was stopped or killed under the run
            raise ServerFailed(f"PostgreSQL stopped answering while the run searched it: "
                               f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
                               ) from error
        return [row[0] for row in rows], [-row[1] for row in rows]

    def filtered(self, session: Session, query: np.ndarray, k: int, setting: Mapping, where: Where) -> tuple[list, list]:
        return self._fetch(session, FILTERED_SQL[where.column], setting,
                           {"query": query, "k": k, "low": where.low, "high": where.high})

    def plan(self, query: np.ndarray, k: int, setting: Mapping, where: Where) -> str | None:
        session = self.session()
        session.apply(setting, f"SET {self.method.knob} = {int(setting[self.method.query_key])}")
        [[found]] = session.connection.execute(f"EXPLAIN (FORMAT JSON) {FILTERED_SQL[where.column]}", {
            "query": query, "k": k, "low": where.low, "high": where.high}, binary=True).fetchall()
        return plan_words(found[0]["Plan"])


def plan_words(node: dict) -> str:
    """A plan as its nodes from the top down the first child, each with the index it scans: `Limit > Index Scan
    (items_embedding_idx)`, or `Limit > Sort > Bitmap Heap Scan > Bitmap Index Scan (items_attribute_idx)`."""
    words = []
    while node is not None:
        words.append(node["Node Type"] + (f" ({node['Index Name']})" if "Index Name" in node else ""))
        node = (node.get("Plans") or [None])[0]
    return " > ".join(words)


class Postgres(DatabaseMethod):
    """What both pgvector indexes share: the server's settings, their checks, and where a run's copy lives."""

    filter_mode = ("its own filter (SQL WHERE on the stored keys, B-tree indexed: PostgreSQL's planner chooses the "
                   "vector index, then the condition, or an exact sort of the rows the condition keeps: filter_plan)")

    module, also_needs, extra = "pgvector.psycopg", ("pgserver", "psycopg"), "db"
    install = "pgvector 'psycopg[binary]' pgserver==0.1.4"  # the last names the version its figures give
    concurrent_searches = True
    # PostgreSQL sizes such as 256MB (checked below)
    server_params = (Param("shared_buffers", SERVER, minimum=None, execution=True),
                     Param("maintenance_work_mem", SERVER, minimum=None, execution=True))
    database_type = PostgresDatabase
    knob = ""  # the session setting the query parameter sets (hnsw.ef_search, ivfflat.probes)
    query_key = ""

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        for key in self.execution_params:
            value = opts.get(key)
            if not isinstance(value, str) or not value[:-2].isdigit() or value[-2:] not in ("kB", "MB", "GB"):
                raise bad_value(f"method.{key}", value, "a PostgreSQL size such as 256MB or 2GB")
        if dim is not None and dim > 2000:
            raise bad_value("dim", dim, "at most 2000 dimensions (pgvector 0.6 indexes no wider vectors)")

    def working_folder(self, near: Path | None) -> tempfile.TemporaryDirectory:
        owner = unprivileged()
        if owner is None or near is None or reachable_by(near.parent, owner[0]):
            return super().working_folder(near)
        # the cache lies under a folder only root may enter (pytest's, a home folder): the server's copy in /tmp
        return new_folder(near, elsewhere=Path(tempfile.gettempdir()))

    def index_sql(self, opts: MethodParams) -> str:
        raise NotImplementedError


class PgvectorHnsw(Postgres):
    name, label = "pgvector_hnsw", "pgvector HNSW (SQL)"
    params = (*Postgres.server_params, *hnsw_params(minimum=2))
    variant_param = "ef_search"
    knob, query_key = "hnsw.ef_search", "ef_search"
    ordering = "inner product (vector_ip_ops, ORDER BY <#>: the negative inner product)"

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        if opts["ef_search"] > 1000:
            raise bad_value("ef_search", opts["ef_search"], "at most 1000 (pgvector's hnsw.ef_search)")

    def check_k(self, opts: MethodParams, k: int) -> None:
        if opts["ef_search"] < k:  # pgvector returns at most ef_search rows through the index
            raise bad_value("ef_search", opts["ef_search"], f"at least k ({k}): pgvector returns at most ef_search rows")

    def index_sql(self, opts: MethodParams) -> str:
        return (f"CREATE INDEX ON items USING hnsw (embedding vector_ip_ops) "
                f"WITH (m = {int(opts['hnsw_m'])}, ef_construction = {int(opts['ef_construction'])})")


class PgvectorIvfflat(Postgres):
    name, label = "pgvector_ivfflat", "pgvector IVFFlat (SQL)"
    params = (*Postgres.server_params, Param("lists", BUILD), Param("probes", QUERY, top_level=True))
    variant_param = "probes"
    knob, query_key = "ivfflat.probes", "probes"
    ordering = "inner product (vector_ip_ops, ORDER BY <#>: the negative inner product)"

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        if gallery_size is not None and opts["lists"] > gallery_size:
            raise bad_value("method.lists", opts["lists"], f"at most the gallery size ({gallery_size})")

    def invalid_combination(self, opts: MethodParams) -> str | None:
        if isinstance(opts.get("probes"), int) and isinstance(opts.get("lists"), int) and opts["probes"] > opts["lists"]:
            return f"probes={opts['probes']} > lists={opts['lists']}"
        return None

    def index_sql(self, opts: MethodParams) -> str:
        return f"CREATE INDEX ON items USING ivfflat (embedding vector_ip_ops) WITH (lists = {int(opts['lists'])})"


METHODS = (PgvectorHnsw(), PgvectorIvfflat())
