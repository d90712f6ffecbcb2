"""The vector databases on a small real store (real Tiny-ImageNet images embedded by the trained EfficientNet-Lite0):
imgret's ids equal the engine's own client calls on the same database; at the most exhaustive level, tie-aware
recall@10 >= 0.99; a saved database reloaded gives the same ids; and no server process outlives a run that
finished, failed, was stopped by SIGTERM or killed.

Each engine's calls are written here with its own client (psycopg and SQL, DuckDB's SQL, LanceDB's, Chroma's and
Qdrant's APIs, Redis's VSIM command, sqlite-vec's SQL, pymilvus's MilvusClient), not imgret's."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, PROJECT_ROOT
from documented import docs_study, documented, run_command, run_small
from imgret.index.build import build_index
from imgret.index.methods import METHODS, is_database
from imgret.measure.metrics import recall_at_ties

K = 10
DATABASES = [name for name in METHODS if is_database(name)]
pytest.importorskip("pgserver", reason="the vector databases need imgret[db]")


def _pgvector(native, queries, setting):
    import psycopg
    from pgvector.psycopg import register_vector

    socket_folder = (native.path / "pgdata" / "postmaster.pid").read_text().splitlines()[4]  # where it listens
    knob = "hnsw.ef_search" if "ef_search" in setting else "ivfflat.probes"
    with psycopg.connect(host=socket_folder, user="postgres", dbname="postgres", autocommit=True) as connection:
        register_vector(connection)
        connection.execute(f"SET {knob} = {next(iter(setting.values()))}")
        return [[row[0] for row in connection.execute(
            "SELECT id FROM items ORDER BY embedding <#> %s LIMIT %s", (query, K)).fetchall()] for query in queries]


def _duckdb(native, queries, setting):
    connection = native.handle.cursor()
    connection.execute(f"SET hnsw_ef_search = {setting['ef_search']}")
    dim = queries.shape[1]
    return [[row[0] for row in connection.execute(
        f"SELECT id FROM items ORDER BY array_negative_inner_product(embedding, ?::FLOAT[{dim}]) LIMIT {K}",
        [query.tolist()]).fetchall()] for query in queries]


def _lancedb(native, queries, setting):
    """One multi-vector call for the batch, as imgret sends it."""
    import lancedb

    table = lancedb.connect(str(native.path / "lance")).open_table("items")
    search = table.search(queries).distance_type("dot").nprobes(setting["nprobes"]).limit(K)
    if setting.get("refine_factor"):
        search = search.refine_factor(setting["refine_factor"])
    if "ef" in setting:
        search = search.ef(setting["ef"])
    rows = search.to_arrow().to_pylist()
    return [[row["id"] for row in rows if row["query_index"] == index] for index in range(len(queries))]


def _chroma(native, queries, setting):
    native.handle.modify(configuration={"hnsw": {"ef_search": setting["ef_search"]}})
    return [[int(row) for row in rows] for rows in native.handle.query(query_embeddings=queries, n_results=K)["ids"]]


def _qdrant(native, queries, setting):
    """Qdrant's request per query (imgret sends one batch request)."""
    import qdrant_edge

    params = qdrant_edge.SearchParams(hnsw_ef=setting["ef_search"]) if setting else qdrant_edge.SearchParams(exact=True)
    return [[point.id for point in native.handle.query(qdrant_edge.QueryRequest(
        limit=K, query=qdrant_edge.Query.Nearest(query.tolist()), params=params))] for query in queries]


def _redis(native, queries, setting):
    import redis

    command = native.server.process.args  # where the server listens: its --unixsocket
    client = redis.Redis(unix_socket_path=command[command.index("--unixsocket") + 1])
    try:
        return [[int(element) for element in client.execute_command(
            "VSIM", "items", "VALUES", len(query), *query.tolist(), "COUNT", K, "EF", setting["ef_search"])]
            for query in queries]
    finally:
        client.close()


def _sqlite_vec(native, queries, setting):
    import apsw
    import sqlite_vec

    connection = apsw.Connection(str(native.path / "vectors.sqlite"))
    connection.enable_load_extension(True)
    connection.load_extension(sqlite_vec.loadable_path())
    try:
        return [[row[0] for row in connection.execute(
            "SELECT rowid FROM items WHERE embedding MATCH ? AND k = ? ORDER BY distance",
            (sqlite_vec.serialize_float32(query.tolist()), K))] for query in queries]
    finally:
        connection.close()


def _milvus(native, queries, setting):
    """pymilvus's search, a request per query (imgret sends the batch as one request), through the unix socket the
    server's forwarder listens on (read from the server's command line)."""
    from pymilvus import MilvusClient

    socket = re.search(r"UNIX-LISTEN:([^,]+),", " ".join(native.server.process.args)).group(1)
    client = MilvusClient(uri=f"unix:{socket}")
    try:
        return [[hit["id"] for hit in client.search("items", data=[query.tolist()], limit=K, anns_field="vector",
                                                    search_params={"metric_type": "IP", "params": {
                                                        "ef" if "ef_search" in setting else "nprobe":
                                                        next(iter(setting.values()))}})[0]] for query in queries]
    finally:
        client.close()


BARE = {"pgvector_hnsw": _pgvector, "pgvector_ivfflat": _pgvector, "duckdb_hnsw": _duckdb, "lancedb": _lancedb,
        "lancedb_hnsw_sq": _lancedb, "chroma": _chroma, "qdrant": _qdrant, "qdrant_exact": _qdrant, "redis": _redis,
        "sqlite_vec": _sqlite_vec, "milvus_hnsw": _milvus, "milvus_ivf": _milvus}
# Lance's IVF_PQ batch call is not repeatable: where candidates tie on their product-quantised score, two identical
# calls may keep different ones (a row or two of 400 in about one build of four on this 600-row gallery, at nprobes 1
# and at 256 with refine_factor 10), so imgret's rows are held to the client's but for that share
VARYING_ROWS = {"lancedb": 0.02}


def compose_method(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"method={name}", "nlist=16", *overrides])


def test_every_database_has_its_client_calls_here():
    assert set(BARE) == set(DATABASES)


def _same_up_to_ties(ids: np.ndarray, bare: np.ndarray, similarities: np.ndarray) -> bool:
    """The same ids, or ids whose exact scores equal the client's rank by rank: rows of equal score may come in
    either order (imgret sends LanceDB one batch call, the client here a call per query)."""
    if np.array_equal(ids, bare):
        return True
    if not np.array_equal(ids < 0, bare < 0):
        return False

    def scores(found):
        return np.where(found >= 0, np.take_along_axis(similarities, np.maximum(found, 0), 1), 0.0)

    return bool(np.allclose(scores(ids), scores(bare), rtol=0, atol=1e-6))


def _agrees(name: str, ids: np.ndarray, bare: np.ndarray, similarities: np.ndarray) -> bool:
    if name in VARYING_ROWS:
        differing = np.mean([len(set(a) - set(b)) for a, b in zip(ids.tolist(), bare.tolist())]) / K
        return differing <= VARYING_ROWS[name]
    return _same_up_to_ties(ids, bare, similarities)


def test_rows_differing_only_where_scores_tie_count_as_the_same_and_others_do_not():
    similarities = np.array([[0.9, 0.5, 0.5, 0.1]])
    assert _same_up_to_ties(np.array([[0, 1, 2]]), np.array([[0, 2, 1]]), similarities)
    assert not _same_up_to_ties(np.array([[0, 1, 2]]), np.array([[0, 1, 3]]), similarities)
    assert not _same_up_to_ties(np.array([[0, 1, -1]]), np.array([[0, 1, 2]]), similarities)


@pytest.mark.slow
@pytest.mark.parametrize("name", DATABASES)
def test_a_database_gives_its_engine_s_own_ids_reaches_0_99_at_its_top_level_and_reloads(name, real_store, tmp_path):
    gallery, queries = real_store
    levels = compose_method(name).method.get("levels")
    cheap, exhaustive = ((compose_method(name, "level=0"), compose_method(name, f"level={len(levels) - 1}")) if levels
                         else (compose_method(name, "level=null"),) * 2)
    built = build_index(exhaustive.method, gallery, tmp_path / "cache", "real")
    server = built.native.server
    similarities = queries @ gallery.T
    try:
        for cfg in (cheap, exhaustive):
            setting = METHODS[name].query_setting(cfg.method)
            ids = built.at(setting).search(queries, K)[1]
            # a query whose probed IVF lists hold fewer than K rows gets fewer: imgret fills the rest with -1
            bare = np.asarray([[*row, *[-1] * (K - len(row))] for row in BARE[name](built.native, queries, dict(setting))],
                              dtype=np.int64)
            assert _agrees(name, ids, bare, similarities), f"{name} at {setting}"
        scores, found = built.index.search(queries, K)
        found_scores = np.take_along_axis(similarities, found, 1)
        if METHODS[name].scores_on is None:
            assert np.allclose(scores, found_scores, atol=1e-4), name
        recall = recall_at_ties(found_scores, np.sort(similarities, axis=1)[:, ::-1][:, :K], K, 1e-6)
        assert recall >= 0.99, f"{name} at {METHODS[name].query_setting(exhaustive.method)}: recall@10 {recall}"
        metrics = built.run_metrics()
        # the rows are on disk (Redis's RDB compresses them: the features hold many zeros)
        assert metrics["ingest_s"] > 0 and metrics["db_disk_bytes"] > gallery.nbytes / 4
        assert ("server_peak_rss_bytes" in metrics) == (server is not None)
    finally:
        built.close()
    if server is not None:
        assert not alive(server.pid), "the server outlived its index"
    again = build_index(exhaustive.method, gallery, tmp_path / "cache", "real")
    try:
        assert again.reused and _agrees(name, again.index.search(queries, K)[1], found, queries @ gallery.T), name
    finally:
        again.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# a database with a server: the name its log gives
SERVERS = {"pgvector_hnsw": "PostgreSQL", "redis": "Redis", "milvus_hnsw": "Milvus"}


def database_run(tmp_path: Path, *overrides: str, method: str = "pgvector_hnsw") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imgret.run", f"method={method}", "data=synthetic_vectors", "data.gallery_size=2000",
         "data.query_size=100", "data.dim=16", "data.intrinsic_dim=8", "threads=1", "search.latency_queries=100",
         f"paths.cache={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
         f"hydra.run.dir={tmp_path / 'out'}", *overrides],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def server_pids(log: str, server: str = "PostgreSQL") -> list[int]:
    return [int(pid) for pid in re.findall(rf"{server} started: pid (\d+)", log)]


def searching_on_the_reopened_server(tmp_path: Path, method: str = "pgvector_hnsw") -> tuple[subprocess.Popen, str]:
    """A database run three seconds into its clients' search, on the server reopened from the cache, and what it
    printed so far."""
    run = database_run(tmp_path, "search.clients=[1]", "search.clients_s=120", method=method)
    seen = ""
    deadline = time.monotonic() + 240
    while len(server_pids(seen, SERVERS[method])) < 2 and time.monotonic() < deadline:  # built, reopened once saved
        seen += run.stdout.readline()
    assert len(server_pids(seen, SERVERS[method])) == 2, seen[-2000:]
    time.sleep(3)
    return run, seen


def last_status(tmp_path: Path) -> str:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["imgret"], order_by=["start_time DESC"])["status"][0]


# a run that fails after its server started: pgvector refuses m > 100 when it creates the index; Redis, at its
# maxmemory, refuses rows; Milvus's failed run is its server killed under it (the next test)
FAILING = {"pgvector_hnsw": ("method.hnsw_m=101", "PostgreSQL could not create the index"),
           "redis": ("method.maxmemory=1mb", "Redis refused the rows")}


@pytest.mark.slow
@pytest.mark.parametrize("method", SERVERS)
def test_no_server_outlives_a_finished_a_failed_or_a_killed_run(tmp_path, method):
    server = SERVERS[method]
    if method == "pgvector_hnsw":  # a finished run's path is the run's own; the others' close is held in process above
        finished_run(tmp_path, server)
    if method in FAILING:
        failing(tmp_path, method, server)
    # SIGTERM's path (the run KILLED, its servers stopped) is the run's own, whatever the server: PostgreSQL's case
    stops = ((signal.SIGTERM, 143), (signal.SIGKILL, -9)) if method == "pgvector_hnsw" else ((signal.SIGKILL, -9),)
    for stop, code in stops:
        run, seen = searching_on_the_reopened_server(tmp_path / stop.name, method)
        os.kill(run.pid, stop)
        seen += run.communicate(timeout=60)[0]
        assert run.returncode == code, seen[-2000:]
        pid = server_pids(seen, server)[-1]
        deadline = time.monotonic() + 20  # after kill -9: the kernel's parent-death signal, then its fast shutdown
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(pid), f"{server} (pid {pid}) outlived a run stopped by {stop.name}"
        if stop == signal.SIGTERM:
            assert last_status(tmp_path / stop.name) == "KILLED"


def finished_run(tmp_path: Path, server: str) -> None:
    finished = database_run(tmp_path / "finished", "search.clients=[1,2]", "search.clients_s=1")
    log = finished.communicate(timeout=300)[0]
    pids = server_pids(log, server)
    assert finished.returncode == 0, log[-2000:]
    assert len(pids) == 2 and not any(map(alive, pids))  # built, then reopened once saved
    assert last_status(tmp_path / "finished") == "FINISHED"
    import mlflow

    metrics = mlflow.search_runs(experiment_names=["imgret"]).iloc[0]
    assert metrics["metrics.qps_clients_2"] > 0 and metrics["metrics.server_peak_rss_bytes"] > 1e6


def failing(tmp_path: Path, method: str, server: str) -> None:
    override, said = FAILING[method]
    failed = database_run(tmp_path / "failed", override, method=method)
    log = failed.communicate(timeout=300)[0]
    assert failed.returncode == 1 and len(server_pids(log, server)) == 1, log[-2000:]
    assert said in log.strip().splitlines()[-1], log[-2000:]
    assert not alive(server_pids(log, server)[0]) and last_status(tmp_path / "failed") == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("method,stop", [("pgvector_hnsw", signal.SIGINT), ("pgvector_hnsw", signal.SIGKILL),
                                         ("milvus_hnsw", signal.SIGKILL)])
def test_a_server_stopped_under_the_run_is_one_line_and_the_run_failed(tmp_path, method, stop):
    """The server stopped (PostgreSQL's SIGINT, its fast shutdown: the backends answer AdminShutdown) or killed while
    the run searches it: one line naming what happened, exit 1, the run FAILED, no traceback, nothing of the
    server's process tree left (Milvus's forwarder dies with it)."""
    run, seen = searching_on_the_reopened_server(tmp_path, method)
    pid = server_pids(seen, SERVERS[method])[-1]
    tree = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    os.kill(pid, stop)
    seen += run.communicate(timeout=120)[0]
    assert run.returncode == 1, seen[-2000:]
    line = seen.strip().splitlines()[-1]
    assert line.startswith(f"error: {SERVERS[method]} stopped answering while the run searched it"), seen[-2000:]
    assert "Traceback" not in seen, seen[-3000:]
    assert last_status(tmp_path) == "FAILED"
    assert not any(map(alive, tree)), [p for p in tree if alive(p)]


@pytest.mark.slow
def test_a_server_that_does_not_start_is_one_line_with_its_log_and_the_run_failed(tmp_path):
    run = database_run(tmp_path, "method.shared_buffers=900000GB")
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 1, log[-2000:]
    line = log.strip().splitlines()[-1]
    assert line.startswith("error: PostgreSQL exited with code") and "log " in line and "shared_buffers" in line, line
    assert last_status(tmp_path) == "FAILED"


@pytest.mark.slow
def test_the_documented_database_run_with_two_clients(tmp_path):
    command = documented("data.gallery_size=20000 data.query_size=200 data.dim=64 method=pgvector_hnsw")
    run = run_small(command.replace("data.gallery_size=20000", "data.gallery_size=3000"), tmp_path,
                    "search.clients_s=0.5")
    assert run["metrics.qps_clients_1"] > 0 and run["metrics.qps_clients_2"] > 0
    assert run["metrics.recall_at_10"] > 0.9 and run["metrics.ingest_s"] > 0


def test_duckdb_s_plan_is_the_hnsw_index_scan_alone(tmp_path):
    """Not the index scan's rows joined back to a sequential scan of every row (DuckDB's late materialization)."""
    rows = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    built = build_index(compose_method("duckdb_hnsw").method, rows, tmp_path / "cache", "rows")
    try:
        session = built.native.session()
        plan = session.connection.execute("EXPLAIN " + session.sql, {"query": rows[0].tolist(), "k": K}).fetchall()
        operators = re.findall(r"│\s*([A-Z_]{4,})\s*│", plan[0][1])
        assert "HNSW_INDEX_SCAN" in operators and "SEQ_SCAN" not in operators, operators
    finally:
        built.close()


def test_clients_search_concurrently_for_the_time_given(tmp_path):
    from imgret.measure.search import concurrent_clients

    rows = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    built = build_index(compose_method("hnswlib", "ef_search=32").method, rows, tmp_path / "cache", "rows")
    start = time.perf_counter()
    run = concurrent_clients(built.index, rows[:50], K, clients=2, seconds=0.5)
    assert 0.5 <= time.perf_counter() - start < 5
    assert run.clients == 2 and run.queries == len(run.latencies_ms) > 10 and run.qps > 0

    class Failing:
        def search(self, queries, k):
            raise RuntimeError("the server went away")

    with pytest.raises(RuntimeError, match="went away"):
        concurrent_clients(Failing(), rows[:5], K, clients=2, seconds=0.5)


def test_searches_at_one_setting_run_together_and_another_setting_waits():
    import threading

    from imgret.index.base import SettingGate

    gate, inside, most, mixed = SettingGate(concurrent=True), [], [0], []
    lock = threading.Lock()

    def search(setting):
        with gate.at(setting):
            with lock:
                inside.append(setting)
                most[0] = max(most[0], len(inside))
                if len(set(map(str, inside))) > 1:  # recorded here, asserted in the test's own thread
                    mixed.append(list(inside))
            time.sleep(0.05)
            with lock:
                inside.remove(setting)

    threads = [threading.Thread(target=search, args=({"ef": ef},)) for ef in (16, 16, 16, 64, 64, 16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mixed, f"two settings searched at once: {mixed}"
    assert most[0] >= 2  # the same setting did run together


@pytest.mark.slow
def test_the_vector_databases_study_and_its_report(tmp_path, tiny_subset_zip):
    """The docs' vector-databases study at the subset's size: a database server and an embedded one, the top level,
    then the report's databases table and the one Pareto plot of libraries and databases."""
    command = documented("+experiment=vector_databases model=efficientnet_lite0 data.archive=")
    work = docs_study(command, tmp_path, tiny_subset_zip, "method=hnswlib,redis,duckdb_hnsw", "level=9",
                      "search.clients_s=0.5")
    printed = run_command(documented("python -m imgret.report --experiment vector_databases"), work).stdout
    assert "Vector databases: what a database adds" in printed
    assert "| Redis 8 vector set HNSW (client API) |" in printed and "| DuckDB vss HNSW (SQL) | " in printed
    assert " / 2 clients" in printed  # each recall target's setting with its QPS under 1 and 2 clients

