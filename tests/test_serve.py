"""The web demo: the library API it stands on, its JSON API on a small real store (real Tiny-ImageNet images,
random weights), every bad input, concurrent requests, and a real server process driven by a load test and
by headless Chromium."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF_DIR, PROJECT_ROOT
from imgret.api import Embedder, open_retriever
from imgret.embed.options import ExtractSettings
from imgret.errors import ConfigError
from imgret.serve.app import ServeSettings, create_app
from imgret.serve.load import run_load

PYTHON = sys.executable
K = 5
SERVE_OVERRIDES = ("model=resnet18", "model.pretrained=false", "model.image_size=32", "batch_size=16", "nlist=4", "nprobe=2",
                   "serve.nprobe=[1,4]", "serve.ef_search=[1,64]", "serve.indexes.hnsw.hnsw_m=4", f"k={K}",
                   "extract.progress=false", "extract.latency_images=2", "num_workers=0")


def serve_config(tmp: Path, archive: Path, digest: str, *overrides: str):
    base = [f"paths.cache={tmp / 'cache'}", f"data.root={tmp / 'data'}", f"data.archive={archive}",
            f"data.checksums=[{digest}]", f"tracking.uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="serve", overrides=[*base, *SERVE_OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_subset_zip):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = serve_config(tmp, *tiny_subset_zip)
    retriever = open_retriever(ExtractSettings.from_config(cfg), cfg.data, list(cfg.serve.indexes.values()),
                               {"nprobe": [1, 4], "ef_search": [1, 64]})
    settings = ServeSettings(max_upload_bytes=1 << 20, max_image_pixels=1_000_000, default_k=K)
    return retriever, TestClient(create_app(retriever, settings)), cfg


def jpeg_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def search(client, *, image: bytes | None = None, name: str = "q.jpg", **form):
    files = {"image": (name, image, "application/octet-stream")} if image is not None else None
    return client.post("/api/search", files=files, data={k: str(v) for k, v in form.items()})


# --------------------------------------------------------------------------- the library API

def test_embedder_reproduces_the_stores_rows(served):
    retriever, _, cfg = served
    rows = retriever.embedder.embed([Image.open(p).convert("RGB") for p in retriever.gallery.paths[:6]])
    stored = np.asarray(retriever.gallery.vectors[:6])
    assert rows.shape == stored.shape
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(rows * stored, axis=1)) > 0.9999  # the same preprocessing, module and normalisation
    other = Embedder.from_settings(ExtractSettings.from_config(OmegaConf.merge(cfg, OmegaConf.from_dotlist(
        ["model.image_size=48"]))))
    moved = other.embed([Image.open(retriever.gallery.paths[0]).convert("RGB")])
    assert float(moved[0] @ stored[0]) < 0.9999  # and the check can fail: another input size gives other rows


def test_index_choices_share_one_built_index_and_differ_in_recall(served):
    retriever, _, _ = served
    names = list(retriever.indexes)
    assert names[0] == "flat" and retriever.default_index == "flat"
    ivf = [n for n in names if n.startswith("ivf")]
    assert ivf == ["ivf nlist=4 nprobe=1", "ivf nlist=4 nprobe=4"]
    assert retriever.indexes[ivf[0]].built is retriever.indexes[ivf[1]].built
    queries = np.asarray(retriever.gallery.vectors[::3])
    exact = retriever.exact(queries, K).ids
    assert np.array_equal(retriever.search(queries, K, "flat").ids, exact)
    assert np.array_equal(retriever.search(queries, K, ivf[1]).ids, exact)  # nprobe = nlist: every list
    one = retriever.search(queries, K, ivf[0]).ids
    assert not np.array_equal(one, exact)  # one list of four misses neighbours
    with pytest.raises(ConfigError, match="index=nope: one of 'flat'"):
        retriever.search(queries, K, "nope")


def test_vector_sources_cannot_be_served(tmp_path, make_cfg):
    cfg = make_cfg("data=synthetic_vectors", "data.gallery_size=500", "data.query_size=10", "data.dim=16")
    with pytest.raises(ConfigError, match="data=synthetic_vectors: an image source"):
        open_retriever(ExtractSettings.from_config(cfg), cfg.data, [cfg.method])
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- the JSON API

def test_health_and_indexes(served):
    retriever, client, _ = served
    health = client.get("/api/health").json()
    assert health == {"status": "ok", "gallery_size": len(retriever.gallery), "dim": 512, "model": "resnet18",
                      "weights": retriever.embedder.description["weights"], "indexes": len(retriever.indexes)}
    assert health["weights"].startswith("random:")  # model.pretrained=false
    listed = client.get("/api/indexes").json()
    assert listed["default"] == "flat" and listed["default_k"] == K and listed["max_k"] == 48
    assert [i["name"] for i in listed["indexes"]] == list(retriever.indexes)
    flat, hnsw = listed["indexes"][0], listed["indexes"][-1]
    assert flat["exact"] and not hnsw["exact"] and hnsw["setting"]["ef_search"] == 64 and hnsw["bytes"] > 0
    assert client.get("/docs").status_code == 200
    assert "/api/search" in client.get("/openapi.json").json()["paths"]


def test_an_uploaded_gallery_image_finds_itself_with_every_field(served):
    retriever, client, _ = served
    row = 7
    response = search(client, image=jpeg_bytes(retriever.gallery.paths[row]), k=K)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"results", "exact", "missed", "recall", "timings_ms", "index", "k", "precision_at_k"}
    first = body["results"][0]
    assert set(first) >= {"id", "path", "label", "class_name", "score"}
    assert first["id"] == row and first["score"] == pytest.approx(1.0, abs=1e-4)
    # relative to the dataset's root: the server's own file layout never leaves it
    assert not first["path"].startswith("/") and retriever.gallery.paths[row].endswith("/" + first["path"])
    assert first["path"].startswith("train/") and first["label"] == int(retriever.gallery.labels[row])
    assert not any(r["path"].startswith("/") for r in body["results"] + body["exact"])
    # words.txt's name, not the WordNet id
    assert not first["class_name"].startswith("n0") and first["class_name"] == retriever.class_name(first["label"])
    assert len(body["results"]) == K and body["recall"] == 1.0 and body["missed"] == []
    assert [r["id"] for r in body["exact"]] == [r["id"] for r in body["results"]]
    assert set(body["timings_ms"]) >= {"decode", "embed", "search"}
    assert all(value >= 0 for value in body["timings_ms"].values()) and body["timings_ms"]["embed"] > 0
    assert body["precision_at_k"] is None  # an upload has no class


def test_approximate_answers_show_the_misses_and_their_recall(served):
    retriever, client, _ = served
    checked = 0
    for row in range(0, len(retriever.gallery), 4):
        body = search(client, image=jpeg_bytes(retriever.gallery.paths[row]), k=K, index="ivf nlist=4 nprobe=1").json()
        found = {r["id"] for r in body["results"]}
        exact = [r["id"] for r in body["exact"]]
        assert body["missed"] == [i for i in exact if i not in found]
        assert body["recall"] == pytest.approx(len(found & set(exact)) / K)
        assert all(r["in_exact"] == (r["id"] in exact) for r in body["results"])
        checked += bool(body["missed"])
    assert checked > 0  # nprobe=1 of 4 lists misses somewhere, or this test shows nothing


def test_a_query_from_the_query_set_has_its_precision(served):
    retriever, client, _ = served
    picked = client.get("/api/queries/random").json()
    assert set(picked) == {"id", "label", "class_name", "thumbnail"}
    body = search(client, query_id=picked["id"], k=K).json()
    assert body["query"]["id"] == picked["id"]
    same_class = sum(r["label"] == picked["label"] for r in body["results"])
    assert body["precision_at_k"] == pytest.approx(same_class / K)
    thumbnail = client.get(picked["thumbnail"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"


def test_a_class_filter_answers_only_that_class_and_its_exact_neighbours_among_it(served):
    retriever, client, _ = served
    classes = client.get("/api/indexes").json()["classes"]
    assert [c["label"] for c in classes] == list(range(len(retriever.class_names))) and len(classes) >= 2
    picked = client.get("/api/queries/random").json()
    other = next(c["label"] for c in classes if c["label"] != picked["label"])  # a class that is not the query's
    labels = np.asarray(retriever.gallery.labels)
    from imgret import api

    vector = retriever.embedder.embed([api.load_image(retriever.queries.paths[picked["id"]])])[0]
    rows = np.flatnonzero(labels == other)  # the exact answer, by numpy over that class's rows
    expected = rows[np.argsort(-(np.asarray(retriever.gallery.vectors)[rows] @ vector))[:K]]
    for index in ("flat", "ivf nlist=4 nprobe=1"):
        body = search(client, query_id=picked["id"], k=K, index=index, class_label=other).json()
        assert body["class_label"] == other and body["results"]
        assert all(r["label"] == other for r in body["results"] + body["exact"])
        assert {r["id"] for r in body["exact"]} == set(expected.tolist())
        assert body["filter_mode"].startswith("its own filter")  # FAISS's IDSelector
    # deeper than the class has rows, and with one IVF list probed: recall over the neighbours that exist, no result
    # never a hit (the exact side's padding is not an answer)
    deep = min(len(rows) + 5, client.get("/api/indexes").json()["max_k"])
    for index in ("flat", "ivf nlist=4 nprobe=1"):
        body = search(client, query_id=picked["id"], k=deep, index=index, class_label=other).json()
        exact_ids, found_ids = {r["id"] for r in body["exact"]}, {r["id"] for r in body["results"]}
        assert len(exact_ids) == min(deep, len(rows))
        assert body["recall"] == pytest.approx(len(found_ids & exact_ids) / len(exact_ids))
    refused = search(client, query_id=picked["id"], k=K, class_label=len(classes))
    assert refused.status_code == 400 and f"class_label={len(classes)}" in refused.json()["detail"]


def test_thumbnails_by_id_only(served):
    retriever, client, _ = served
    response = client.get("/api/thumbnails/3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) <= 160
    assert client.get(f"/api/thumbnails/{len(retriever.gallery)}").status_code == 404
    assert client.get("/api/thumbnails/-1").status_code == 404
    for path in ("/api/thumbnails/..%2F..%2Fetc%2Fpasswd", "/api/thumbnails/%2Fetc%2Fpasswd"):
        assert client.get(path).status_code in (404, 422)


def bomb_png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (4000, 4000)).save(out, "PNG", optimize=True)  # 16 megapixels in a few kilobytes
    return out.getvalue()


@pytest.mark.parametrize("name, content, status, says", [
    ("notes.txt", b"this is not an image", 415, "not an image"),
    ("empty.jpg", b"", 400, "empty"),
    ("cut.jpg", "truncated", 400, "truncated"),
    ("bomb.png", "bomb", 413, "serve.max_image_pixels=1000000"),
    ("big.jpg", b"\xff" * ((1 << 20) + 1), 413, "serve.max_upload_mb"),
])
def test_bad_uploads_get_their_4xx(served, name, content, status, says):
    retriever, client, _ = served
    if content == "truncated":
        whole = jpeg_bytes(retriever.gallery.paths[0])
        content = whole[: len(whole) // 2]
    elif content == "bomb":
        content = bomb_png()
    response = search(client, image=content, name=name, k=K)
    assert response.status_code == status, response.text
    assert says in response.json()["detail"] and "Traceback" not in response.text


@pytest.mark.parametrize("form, status, says", [
    ({"query_id": 0, "k": 0}, 400, "k=0"),
    ({"query_id": 0, "k": 49}, 400, "k=49"),
    ({"query_id": 0, "k": "ten"}, 422, "integer"),
    ({"query_id": 0, "index": "nope"}, 400, "index=nope: one of 'flat'"),
    ({"query_id": 10_000}, 404, "query_id=10000"),
    ({"k": 3}, 400, "send an image"),
    # a long value is cut in the answer, which says how long it was (not echoed whole)
    ({"query_id": 0, "index": "x" * 500_000}, 400, "... (500,000 characters): one of 'flat'"),
])
def test_bad_search_requests_say_what_is_allowed(served, form, status, says):
    _, client, _ = served
    response = search(client, **form)
    assert response.status_code == status, response.text
    assert says in response.text and "Traceback" not in response.text and len(response.text) < 2000


def test_concurrent_requests_get_the_answers_they_would_get_alone(served):
    retriever, client, _ = served
    names = [n for n in retriever.indexes if not n.startswith("flat")]
    rows = list(range(0, 40, 5))
    jobs = [(row, name) for row in rows for name in names]
    alone = {(row, name): [r["id"] for r in search(client, image=jpeg_bytes(retriever.gallery.paths[row]), k=K,
                                                    index=name).json()["results"]] for row, name in jobs}
    assert len({tuple(v) for (row, name), v in alone.items() if row == rows[1]}) > 1  # the settings differ

    def ask(job):
        row, name = job
        response = search(client, image=jpeg_bytes(retriever.gallery.paths[row]), k=K, index=name)
        return job, response.status_code, [r["id"] for r in response.json()["results"]]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs * 3))
    assert all(status == 200 and ids == alone[job] for job, status, ids in answers)


# --------------------------------------------------------------------------- a real server process

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_subset_zip):
    """`python -m imgret.serve` in its own process, on a free loopback port; stopped by its process id."""
    archive, digest = tiny_subset_zip
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    log_path = tmp / "server.log"
    overrides = [f"paths.cache={tmp / 'cache'}", f"data.root={tmp / 'data'}", f"data.archive={archive}",
                 f"data.checksums=[{digest}]", f"serve.port={port}", "serve.max_upload_mb=1", *SERVE_OVERRIDES,
                 f"hydra.run.dir={tmp / 'hydra'}"]
    with open(log_path, "w") as log:
        process = subprocess.Popen([PYTHON, "-m", "imgret.serve", *overrides], cwd=tmp, stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not listen within 240 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, process, log_path
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_the_server_binds_loopback_and_refuses_an_oversized_chunked_upload(server):
    import httpx

    url, process, log_path = server
    listening = [c.laddr for c in psutil.Process(process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
    assert f"serving the demo at {url}/" in log_path.read_text()

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 65536

    response = httpx.post(f"{url}/api/search", content=chunks(), timeout=30,
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "serve.max_upload_mb" in response.json()["detail"]


@pytest.mark.slow
def test_load_on_loopback(server, tiny_subset_zip):
    url, _, _ = server
    with zipfile.ZipFile(tiny_subset_zip[0]) as archive:
        image = next(n for n in archive.namelist() if n.endswith(".JPEG"))
        query = Path(os.environ.get("TMPDIR", "/tmp")) / f"imgret-load-{os.getpid()}.jpg"
        query.write_bytes(archive.read(image))
    try:
        uploads = run_load(url, requests=200, concurrency=8, max_seconds=30, image=query, k=K)
    finally:
        query.unlink()
    by_id = run_load(url, requests=60, concurrency=4, max_seconds=15, k=K, index="ivf nlist=4 nprobe=1")
    print(f"\nuploads: {uploads.describe()}\nquery ids: {by_id.describe()}")
    assert uploads.requests == 200 and uploads.errors == 0, uploads.statuses
    assert by_id.requests == 60 and by_id.errors == 0, by_id.statuses
    assert 0 < uploads.p50_ms <= uploads.p99_ms


@pytest.mark.slow
def test_the_page_in_headless_chromium(server, tiny_subset_zip, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: apt-get install chromium (.ci/run installs it)")
    url, _, _ = server
    with zipfile.ZipFile(tiny_subset_zip[0]) as archive:
        name = next(n for n in archive.namelist() if "/train/" in n and n.endswith(".JPEG"))
        upload = tmp_path / "query.jpg"
        upload.write_bytes(archive.read(name))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            thumbnails, held = [], []
            page.on("response", lambda r: thumbnails.append(r.status) if "/api/thumbnails/" in r.url else None)
            page.goto(url)
            expect(page.get_by_test_id("index")).to_contain_text("ivf nlist=4 nprobe=1")
            expect(page.locator("#about")).to_contain_text("gallery images · resnet18 (random weights)")

            # the thumbnails held back until the cards are read: a slow server, on any machine
            page.route("**/api/thumbnails/*", lambda route: held.append(route))
            page.get_by_test_id("file").set_input_files(str(upload))
            cards = page.locator("#results .card")
            expect(cards).to_have_count(K)
            expect(cards.first).to_contain_text("similarity 1.000")
            for stage in ("decode", "embed", "search"):
                expect(page.locator(f"#timings tr[data-stage={stage}]")).to_contain_text(" ms")
            expect(page.get_by_test_id("summary")).to_contain_text("this index is exact")
            first = page.locator("#results .card img").first
            assert first.evaluate("img => img.complete") is False, "its thumbnail is still on its way"
            for route in held:
                route.continue_()
            page.unroute("**/api/thumbnails/*")
            # what is read is waited for: the image's load (its width) or its failure to load (-1)
            width = first.evaluate("""img => img.complete ? (img.naturalWidth || -1) : new Promise(done => {
                img.addEventListener("load", () => done(img.naturalWidth));
                img.addEventListener("error", () => done(-1)); })""")
            assert width > 0, f"the first result's thumbnail did not load; thumbnail answers: {thumbnails}"
            assert thumbnails and set(thumbnails) == {200}

            page.get_by_test_id("index").select_option("ivf nlist=4 nprobe=1")
            expect(page.locator("#exact .card")).to_have_count(K)
            expect(page.get_by_test_id("summary")).to_contain_text("missed")

            page.get_by_test_id("random").click()
            expect(page.get_by_test_id("summary")).to_contain_text(f"precision@{K}")
            expect(page.get_by_test_id("error")).to_have_text("")

            page.get_by_test_id("k").fill("0")
            page.get_by_test_id("k").dispatch_event("change")
            expect(page.get_by_test_id("error")).to_contain_text("400: k=0")
        finally:
            browser.close()


def test_a_full_decode_budget_answers_503_with_retry_after(served):
    from imgret.serve.app import Busy, DecodeBudget

    retriever, client, _ = served
    demo = client.app.state.demo
    saved, demo.budget = demo.budget, DecodeBudget(pixels=1000, wait_s=0.05)
    try:
        with demo.budget.hold(1000):  # another request's decode holds all of it
            response = search(client, image=jpeg_bytes(retriever.gallery.paths[0]), k=K)
        assert response.status_code == 503 and response.headers["Retry-After"].isdigit()
        assert "busy decoding other images" in response.json()["detail"]
        assert search(client, image=jpeg_bytes(retriever.gallery.paths[0]), k=K).status_code == 200  # released
        with pytest.raises(Busy), demo.budget.hold(600), demo.budget.hold(600):
            pass
    finally:
        demo.budget = saved


def test_a_large_image_is_decoded_reduced_within_its_hold(tmp_path):
    """libjpeg's scaled decode and the reduction: a 4,000 px JPEG needed at 256 px decodes at 1/8 (500 px) and is
    not reduced further (250 px would be below 256); a PNG is decoded whole, then reduced by 11 (4000/256)."""
    from imgret.sources.decode import decode_image

    big = tmp_path / "big.jpg"
    Image.radial_gradient("L").resize((4000, 3000)).convert("RGB").save(big, quality=90)
    held = []

    def hold(pixels):
        held.append(pixels)
        return contextlib.nullcontext()

    image = decode_image(str(big), "big.jpg", 25_000_000, needed_side=256, hold=hold)
    assert held == [500 * 375] and image.size == (500, 375)  # 1/8 scale: only that was ever decoded
    png = tmp_path / "big.png"
    Image.radial_gradient("L").resize((4000, 3000)).save(png)
    held.clear()
    image = decode_image(str(png), "big.png", 25_000_000, needed_side=256, hold=hold)
    assert held == [4000 * 3000] and image.size == (364, 273) and image.mode == "RGB"


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(out, "PNG")
    return out.getvalue()


def test_a_thin_image_is_refused_and_a_wide_one_holds_the_budget_for_its_resize_until_its_batch_is_made(served):
    """8,000 x 1 pixels: 415 from the header. 1,000 x 20 (within the ratio): the budget is held, while the model's
    resize and crop run, for the resize's output (larger than the decode), not for the decode's 20,000 pixels."""
    from imgret.sources.decode import work_pixels

    retriever, client, _ = served
    response = search(client, image=png_bytes(8000, 1), name="thin.png", k=K)
    assert response.status_code == 415 and "8000x1 pixels: an aspect ratio over 100:1" in response.json()["detail"]
    demo = client.app.state.demo
    held, prepared = [], demo.prepared
    demo.prepared = lambda image: (held.append(demo.budget.in_flight), prepared(image))[1]
    try:
        assert search(client, image=png_bytes(1000, 20), name="wide.png", k=K).status_code == 200
    finally:
        demo.prepared = prepared
    assert held == [work_pixels(1000, 20, demo.needed_side)] and held[0] > 1000 * 20
    assert demo.budget.in_flight == 0


@pytest.mark.slow
def test_thin_images_cost_the_server_no_memory(server):
    """The hostile uploads of the audit, and thinner: each alone and four at once. Before the header check, an
    8,000 x 1 PNG at the default model raised the server's peak by gigabytes; at this server's 32-pixel model a
    200,000 x 1 one does."""
    url, process, _ = server
    import httpx

    before = peak_rss_bytes(process.pid)
    for width in (8000, 20_000, 200_000):
        response = httpx.post(f"{url}/api/search", files={"image": ("thin.png", png_bytes(width, 1))},
                              data={"k": str(K)}, timeout=60)
        assert response.status_code == 415 and "aspect ratio" in response.json()["detail"], response.text
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{url}/api/search", data={"k": str(K)}, timeout=60,
                                                     files={"image": ("thin.png", png_bytes(200_000, 1))}), range(4)))
    assert [a.status_code for a in answers] == [415] * 4
    assert peak_rss_bytes(process.pid) - before < THIN_IMAGES_PEAK_GROWTH_BOUND


# The demo's memory under hostile load: a 24-megapixel PNG compresses to a few KB (one colour) but decodes to 72 MB.
# Before the decode budget, 100 of them at once took the server from 0.95 GB to 16.88 GB resident here (14.60 GB
# after); with it, to 1.61 GB (see README).
PEAK_RSS_GROWTH_BOUND = 1 << 30  # the default budget, 100 megapixels, is 0.3-0.4 GB decoded
THIN_IMAGES_PEAK_GROWTH_BOUND = 64 << 20  # refused from the header: nothing is decoded


def peak_rss_bytes(pid: int) -> int:
    """The process's resident high-water mark since it started (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.slow
def test_a_hundred_concurrent_24_megapixel_pngs_keep_the_server_within_its_memory(server, tmp_path, tiny_subset_zip):
    url, process, log_path = server
    bomb = tmp_path / "24mp.png"
    Image.new("RGB", (6000, 4000), (90, 140, 200)).save(bomb)
    assert bomb.stat().st_size < 1 << 20  # under serve.max_upload_mb=1: only the decode is large
    before = psutil.Process(process.pid).memory_info().rss
    hostile = run_load(url, requests=100, concurrency=100, max_seconds=180, image=bomb, k=K)
    peak = peak_rss_bytes(process.pid)
    print(f"\n24 MP PNGs: {hostile.describe()}; server RSS before {before / 2**30:.2f} GB, peak "
          f"{peak / 2**30:.2f} GB, after {psutil.Process(process.pid).memory_info().rss / 2**30:.2f} GB")
    assert hostile.requests == 100
    assert set(hostile.statuses) <= {"200", "503"}, hostile.statuses  # served, or told to come back
    assert hostile.statuses.get("200", 0) >= 10
    assert peak - before < PEAK_RSS_GROWTH_BOUND, f"peak resident set {peak / 2**30:.2f} GB from {before / 2**30:.2f}"
    # and it still answers, at once
    with zipfile.ZipFile(tiny_subset_zip[0]) as archive:
        small = tmp_path / "small.jpg"
        small.write_bytes(archive.read(next(n for n in archive.namelist() if n.endswith(".JPEG"))))
    after = run_load(url, requests=5, concurrency=1, max_seconds=30, image=small, k=K)
    assert after.errors == 0, after.statuses
