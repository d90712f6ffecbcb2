"""The web demo's application: a page and a JSON API over one `Retriever` (imgret.api).

Every request embeds with the retriever's model and searches its indexes; nothing here preprocesses,
loads an index or searches by itself. The model runs one request at a time (a lock: two cores gain nothing
from two forwards at once, and it keeps torch's threads from oversubscribing); decoding, searches and
thumbnails run concurrently. Errors answer with a status and one line, never a stack trace.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import random
import threading
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from imgret.api import Retriever
from imgret.errors import BadImage, ImgretError, bad_value
from imgret.measure.metrics import precision_at, recall_at
from imgret.sources.decode import decode_image, open_image

log = logging.getLogger(__name__)

THUMBNAIL_PIXELS = 160
# BadImage.kind -> the answer: not an image at all; an image too large to decode; one that fails to decode.
BAD_IMAGE_STATUS = {"not_an_image": 415, "too_many_pixels": 413, "damaged": 400}


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 10 << 20
    max_image_pixels: int = 25_000_000
    max_k: int = 100
    default_k: int = 10


class UploadLimit:
    """Answers 413 to a request body over `max_bytes`: from its Content-Length before reading anything,
    and, for a body without one (chunked), as soon as the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._too_large(int(declared))}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large(received, at_least=True))
            return message

        return await self.app(scope, limited_receive, send)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (f"the upload is {'over ' if at_least else ''}{size / 2**20:.1f} MB; serve.max_upload_mb allows "
                f"{self.max_bytes / 2**20:g} MB")


def create_app(retriever: Retriever, settings: ServeSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        # One request's path before the first real one: the thread pool, Pillow's decoder, the model and the
        # default index pay their first-call costs here, not on the first request's timings.
        sample = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(sample, "JPEG")
        picture = await run_in_threadpool(decode_upload, sample.getvalue(), "warm-up.jpg")
        await run_in_threadpool(answer, picture, min(settings.default_k, max_k), retriever.default_index, None)
        yield

    app = FastAPI(title="imgret", version="1", lifespan=lifespan,
                  description="Image retrieval: a query image in, its nearest gallery images out, with what each "
                              "stage cost and what the approximate index missed against exact search.")
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    model_lock = threading.Lock()
    gallery_size = len(retriever.gallery)
    max_k = min(settings.max_k, gallery_size)
    page = resources.files("imgret.serve").joinpath("page.html").read_text()

    @app.exception_handler(ImgretError)
    async def imgret_error(request: Request, error: ImgretError):  # a bad k or index name: one line, no trace
        return JSONResponse({"detail": str(error)}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("while answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(error).__name__}); see the server's log"},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return page

    @app.get("/api/health")
    def health():
        return {"status": "ok", "gallery_size": gallery_size, "dim": retriever.gallery.dim,
                "model": retriever.embedder.name if retriever.embedder else None,
                "weights": retriever.embedder.description["weights"] if retriever.embedder else None,
                "indexes": len(retriever.indexes)}

    @app.get("/api/indexes")
    def indexes():
        return {
            "default": retriever.default_index,
            "default_k": min(settings.default_k, max_k),
            "max_k": max_k,
            "gallery_size": gallery_size,
            "query_set_size": len(retriever.queries) if retriever.queries is not None else 0,
            "indexes": [{"name": c.name, "method": c.method, "exact": c.exact, "setting": c.setting,
                         "build_s": round(c.built.build_s, 3), "bytes": int(c.built.nbytes)}
                        for c in retriever.choices],
        }

    def query_record(query_id: int) -> dict:
        queries = retriever.queries
        if queries is None or not 0 <= query_id < len(queries):
            raise HTTPException(404, f"query_id={query_id} is not in the query set "
                                     f"(0 to {len(queries) - 1 if queries is not None else -1})")
        label = int(queries.labels[query_id])
        return {"id": query_id, "label": label, "class_name": retriever.class_name(label),
                "thumbnail": f"/api/queries/{query_id}/thumbnail"}

    @app.get("/api/queries/random")
    def random_query():
        if retriever.queries is None or len(retriever.queries) == 0:
            raise HTTPException(404, "this server has no query set")
        return query_record(random.randrange(len(retriever.queries)))

    def thumbnail_bytes(path: str) -> bytes:
        try:
            image = open_image(path, settings.max_image_pixels)
        except BadImage as error:
            raise HTTPException(404, f"no thumbnail: {error.reason}") from error
        image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    @functools.lru_cache(maxsize=4096)
    def gallery_thumbnail(row: int) -> bytes:
        return thumbnail_bytes(retriever.gallery.paths[row])

    @app.get("/api/thumbnails/{gallery_id}", responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(gallery_id: int):
        """A gallery image, at most 160 pixels a side, by its id (its row in the store): never by path."""
        if not 0 <= gallery_id < gallery_size:
            raise HTTPException(404, f"gallery_id={gallery_id} is not in the gallery (0 to {gallery_size - 1})")
        return Response(gallery_thumbnail(gallery_id), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/api/queries/{query_id}/thumbnail", responses={200: {"content": {"image/jpeg": {}}}})
    def query_thumbnail(query_id: int):
        query_record(query_id)
        return Response(thumbnail_bytes(retriever.queries.paths[query_id]), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    def decode_upload(data: bytes, name: str):
        try:
            return decode_image(io.BytesIO(data), name, settings.max_image_pixels, "serve.max_image_pixels")
        except BadImage as error:
            status = BAD_IMAGE_STATUS.get(error.kind, 400)
            if status == 415:  # Pillow's reason names only its in-memory buffer
                raise HTTPException(status, f"{name}: not an image this server reads (JPEG, PNG, GIF, WebP, BMP, "
                                            "TIFF, ...)") from error
            what = "too many pixels" if status == 413 else "a damaged or truncated image"
            raise HTTPException(status, f"{name}: {what}: {error.reason}") from error

    def open_query(query_id: int):
        try:
            return open_image(retriever.queries.paths[query_id], settings.max_image_pixels)
        except BadImage as error:
            raise HTTPException(400, f"query {query_id}: {error.reason}") from error

    def answer(image, k: int, index: str, query: dict | None) -> dict:
        choice = retriever.check(k, index)
        timings = {}
        start = time.perf_counter()
        batch = retriever.embedder.prepare([image])
        timings["preprocess"] = (time.perf_counter() - start) * 1000
        with model_lock:
            start = time.perf_counter()
            vector = retriever.embedder.embed_prepared(batch)
            timings["embed"] = (time.perf_counter() - start) * 1000
        found = retriever.search(vector, k, choice.name)
        timings["search"] = found.seconds * 1000
        exact = retriever.exact(vector, k)
        timings["exact_search"] = exact.seconds * 1000
        exact_ids = set(exact.ids[0].tolist())
        found_ids = set(found.ids[0].tolist())
        results = [{**retriever.describe(i), "score": float(s), "in_exact": i in exact_ids}
                   for i, s in zip(found.ids[0].tolist(), found.scores[0].tolist()) if i >= 0]
        reference = [{**retriever.describe(i), "score": float(s), "found": i in found_ids}
                     for i, s in zip(exact.ids[0].tolist(), exact.scores[0].tolist())]
        body = {
            "index": choice.name, "exact_index": choice.exact, "k": k,
            "results": results, "exact": reference,
            "missed": [r["id"] for r in reference if not r["found"]],
            "recall": recall_at(found.ids, exact.ids, k),
            "query": query, "precision_at_k": None, "timings_ms": timings,
        }
        if query is not None:
            labels = np.asarray(retriever.gallery.labels)
            body["precision_at_k"] = precision_at(found.ids, labels, np.asarray([query["label"]]), k)
        return body

    @app.post("/api/search")
    async def search(image: UploadFile | None = File(None, description="the query image (JPEG, PNG, ...)"),
                     query_id: int | None = Form(None, description="or: a query from the query set, by id"),
                     k: int | None = Form(None, description="how many neighbours (1 to max_k; default 10)"),
                     index: str | None = Form(None, description="one of GET /api/indexes' names")):
        """Embed the image, search the chosen index, and the exact index beside it. `timings_ms` holds
        decode (reading the upload into pixels), preprocess, embed, search and exact_search."""
        k = min(settings.default_k, max_k) if k is None else k
        if not 1 <= k <= max_k:
            raise HTTPException(400, str(bad_value("k", k, f"a whole number from 1 to {max_k} (serve.max_k, at most "
                                                           "the gallery size)")))
        index = index or retriever.default_index
        retriever.check(k, index)  # a bad index name: answered before any image is read
        start = time.perf_counter()
        if image is not None and image.filename:
            data = await image.read()
            if not data:
                raise HTTPException(400, f"{image.filename}: the upload is empty")
            picture = await run_in_threadpool(decode_upload, data, image.filename)
            query = None
        elif query_id is not None:
            query = query_record(query_id)
            picture = await run_in_threadpool(open_query, query_id)
        else:
            raise HTTPException(400, "send an image (multipart field 'image') or a query_id from the query set")
        decode_ms = (time.perf_counter() - start) * 1000
        body = await run_in_threadpool(answer, picture, k, index, query)
        body["timings_ms"] = {"decode": decode_ms, **body["timings_ms"]}
        return body

    return app
