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
from imgret.allocator import return_freed_memory
from imgret.errors import BadImage, ImgretError, bad_value, shown
from imgret.measure.metrics import precision_at, recall_at
from imgret.sources.decode import decode_image, open_image

log = logging.getLogger(__name__)

THUMBNAIL_PIXELS = 160
# BadImage.kind -> the answer: not an image at all, or of an extreme aspect ratio; an image too large to decode (or
# to resize to the model's size); one that fails to decode.
BAD_IMAGE_STATUS = {"not_an_image": 415, "bad_shape": 415, "too_many_pixels": 413, "damaged": 400}


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 10 << 20
    max_image_pixels: int = 25_000_000
    max_k: int = 100
    default_k: int = 10
    decode_budget_pixels: int = 100_000_000  # pixels decoded at once, across requests
    decode_wait_s: float = 10.0  # how long a request waits for the budget before 503


class Busy(Exception):
    """The decode budget stayed full for the whole wait."""


class DecodeBudget:
    """Pixels decoded at once across requests: a request holds its image's pixel count while it decodes and
    reduces it, waits while the others hold the rest, and gives up after `wait_s` (answered 503 with Retry-After).
    An upload that compresses a 24-megapixel image into a few KB costs 72 MB or more decoded: without a bound, a
    hundred at once exhaust the machine. One image larger than the whole budget may still decode, alone."""

    def __init__(self, pixels: int, wait_s: float):
        self.capacity, self.wait_s = int(pixels), float(wait_s)
        self.in_flight = 0
        self.condition = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = min(int(pixels), self.capacity)
        with self.condition:
            if not self.condition.wait_for(lambda: self.in_flight + pixels <= self.capacity, timeout=self.wait_s):
                raise Busy(f"{self.in_flight / 1e6:.0f} of serve.decode_budget_mp={self.capacity / 1e6:g} megapixels "
                           f"are being decoded; this image needs {pixels / 1e6:.1f}")
            self.in_flight += pixels
        try:
            yield
        finally:
            with self.condition:
                self.in_flight -= pixels
                self.condition.notify_all()


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


def bad_image_answer(error: BadImage, name: str, status: int | None = None) -> HTTPException:
    """The one mapping from an image that cannot be used to an answer: 415 not an image, 413 too many pixels, 400
    damaged (or `status`, for an image the server itself holds)."""
    status = status or BAD_IMAGE_STATUS.get(error.kind, 400)
    if status == 415 and error.kind == "not_an_image":  # Pillow's reason names only its in-memory buffer
        return HTTPException(status, f"{name}: not an image this server reads (JPEG, PNG, GIF, WebP, BMP, TIFF, ...)")
    what = {413: "too many pixels: ", 400: "a damaged or truncated image: "}.get(status, "")
    return HTTPException(status, f"{name}: {what}{error.reason}")


class Demo:
    """What the routes answer with, over one retriever: each handler a method, registered by `create_app`."""

    def __init__(self, retriever: Retriever, settings: ServeSettings):
        self.retriever, self.settings = retriever, settings
        self.model_lock = threading.Lock()
        self.gallery_size = len(retriever.gallery)
        self.max_k = min(settings.max_k, self.gallery_size)
        self.default_k = min(settings.default_k, self.max_k)
        self.page = resources.files("imgret.serve").joinpath("page.html").read_text()
        self.gallery_thumbnail = functools.lru_cache(maxsize=4096)(self._gallery_thumbnail)
        self.budget = DecodeBudget(settings.decode_budget_pixels, settings.decode_wait_s)
        embedder = retriever.embedder
        self.needed_side = embedder.preprocessing.needed_side if embedder is not None else None

    def index_page(self):
        return self.page

    def health(self):
        embedder = self.retriever.embedder
        return {"status": "ok", "gallery_size": self.gallery_size, "dim": self.retriever.gallery.dim,
                "model": embedder.name if embedder else None,
                "weights": embedder.description["weights"] if embedder else None,
                "indexes": len(self.retriever.indexes)}

    def indexes(self):
        retriever = self.retriever
        return {
            "default": retriever.default_index, "default_k": self.default_k, "max_k": self.max_k,
            "gallery_size": self.gallery_size,
            "query_set_size": len(retriever.queries) if retriever.queries is not None else 0,
            "indexes": [{"name": c.name, "method": c.method, "exact": c.exact, "setting": c.setting,
                         "build_s": round(c.built.build_s, 3), "bytes": int(c.built.nbytes)}
                        for c in retriever.choices],
            "classes": [{"label": label, "class_name": retriever.class_name(label)}
                        for label in range(len(retriever.class_names))],  # what class_label may be
        }

    def query_record(self, query_id: int) -> dict:
        queries = self.retriever.queries
        if queries is None or not 0 <= query_id < len(queries):
            raise HTTPException(404, f"query_id={query_id} is not in the query set "
                                     f"(0 to {len(queries) - 1 if queries is not None else -1})")
        label = int(queries.labels[query_id])
        return {"id": query_id, "label": label, "class_name": self.retriever.class_name(label),
                "thumbnail": f"/api/queries/{query_id}/thumbnail"}

    def random_query(self):
        if self.retriever.queries is None or len(self.retriever.queries) == 0:
            raise HTTPException(404, "this server has no query set")
        return self.query_record(random.randrange(len(self.retriever.queries)))

    def thumbnail_bytes(self, path: str, name: str) -> bytes:
        try:
            image = open_image(path, self.settings.max_image_pixels)
        except BadImage as error:
            raise bad_image_answer(error, f"no thumbnail of {name}", status=404) from error
        image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    def _gallery_thumbnail(self, row: int) -> bytes:
        return self.thumbnail_bytes(self.retriever.gallery.paths[row], f"gallery image {row}")

    def thumbnail(self, gallery_id: int):
        """A gallery image, at most 160 pixels a side, by its id (its row in the store): never by path."""
        if not 0 <= gallery_id < self.gallery_size:
            raise HTTPException(404, f"gallery_id={gallery_id} is not in the gallery (0 to {self.gallery_size - 1})")
        return Response(self.gallery_thumbnail(gallery_id), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    def query_thumbnail(self, query_id: int):
        self.query_record(query_id)
        return Response(self.thumbnail_bytes(self.retriever.queries.paths[query_id], f"query {query_id}"),
                        media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    def prepare_upload(self, data: bytes, name: str):
        """The upload as the model's uint8 batch of one: decoded within the budget (a large JPEG at a reduced scale,
        any large image reduced at once), so that only small pixels outlive the decode. The budget is held for the
        most pixels the image takes on its way (the decode, or the model's resize of a thin image) until the batch
        is made: the resize's output counts too."""
        try:
            with contextlib.ExitStack() as held:
                def hold_until_prepared(pixels: int):
                    held.enter_context(self.budget.hold(pixels))
                    return contextlib.nullcontext()

                image = decode_image(io.BytesIO(data), name, self.settings.max_image_pixels, "serve.max_image_pixels",
                                     self.needed_side, hold_until_prepared)
                return self.prepared(image)
        except BadImage as error:
            raise bad_image_answer(error, name) from error
        except Busy as error:
            raise HTTPException(503, f"{name}: the server is busy decoding other images ({error}); try again",
                                headers={"Retry-After": str(max(1, round(self.settings.decode_wait_s / 2)))}) \
                from error
        finally:  # the full-size decode is garbage by now
            return_freed_memory()  # glibc keeps a burst's freed heap otherwise, and the process stays at its peak

    def prepared(self, image) -> tuple:
        """(the model's uint8 batch of one, the milliseconds its resize and crop took)."""
        start = time.perf_counter()
        batch = self.retriever.embedder.prepare([image])
        return batch, (time.perf_counter() - start) * 1000

    def prepare_query(self, query_id: int):
        try:
            image = open_image(self.retriever.queries.paths[query_id], self.settings.max_image_pixels)
        except BadImage as error:
            raise bad_image_answer(error, f"query {query_id}", status=400) from error
        return self.prepared(image)

    def answer(self, batch, k: int, index: str, query: dict | None, class_label: int | None = None) -> dict:
        """Embed a prepared batch of one (`prepare_upload`, `prepare_query`) and search it (among the gallery rows
        of `class_label` only, when it is given)."""
        retriever = self.retriever
        choice = retriever.check(k, index)
        timings = {}
        with self.model_lock:
            start = time.perf_counter()
            vector = retriever.embedder.embed_prepared(batch)
            timings["embed"] = (time.perf_counter() - start) * 1000
        found = retriever.search(vector, k, choice.name, class_label)
        timings["search"] = found.seconds * 1000
        exact = retriever.exact(vector, k, class_label)
        timings["exact_search"] = exact.seconds * 1000
        exact_ids = set(exact.ids[0].tolist())
        found_ids = set(found.ids[0].tolist())
        results = [{**retriever.describe(i), "score": float(s), "in_exact": i in exact_ids}
                   for i, s in zip(found.ids[0].tolist(), found.scores[0].tolist()) if i >= 0]
        reference = [{**retriever.describe(i), "score": float(s), "found": i in found_ids}
                     for i, s in zip(exact.ids[0].tolist(), exact.scores[0].tolist()) if i >= 0]
        body = {
            "index": choice.name, "exact_index": choice.exact, "k": k,
            "results": results, "exact": reference,
            "missed": [r["id"] for r in reference if not r["found"]],
            "recall": recall if np.isfinite(recall := recall_at(found.ids, exact.ids, k)) else None,
            "query": query, "precision_at_k": None, "timings_ms": timings, "class_label": class_label,
            "filter_mode": None if class_label is None else choice.built.method.filter_mode,
        }
        if query is not None:
            labels = np.asarray(retriever.gallery.labels)
            body["precision_at_k"] = precision_at(found.ids, labels, np.asarray([query["label"]]), k)
        return body

    async def search(self, image: UploadFile | None = File(None, description="the query image (JPEG, PNG, ...)"),
                     query_id: int | None = Form(None, description="or: a query from the query set, by id"),
                     k: int | None = Form(None, description="how many neighbours (1 to max_k; default 10)"),
                     index: str | None = Form(None, description="one of GET /api/indexes' names"),
                     class_label: int | None = Form(None, description="only gallery images of this class (a filter): "
                                                                      "one of GET /api/indexes' classes")):
        """Embed the image, search the chosen index, and the exact index beside it. `timings_ms` holds
        decode (the upload into pixels, a large one reduced), preprocess (the model's resize and crop), embed, search
        and exact_search.
        503 with Retry-After when the decode budget stays full (serve.decode_budget_mp)."""
        k = self.default_k if k is None else k
        if not 1 <= k <= self.max_k:
            raise HTTPException(400, str(bad_value("k", k, f"a whole number from 1 to {self.max_k} (serve.max_k, at "
                                                           "most the gallery size)")))
        index = index or self.retriever.default_index
        self.retriever.check(k, index)  # a bad index name: answered before any image is read
        classes = len(self.retriever.class_names)
        if class_label is not None and not 0 <= class_label < classes:
            raise HTTPException(400, str(bad_value("class_label", class_label, f"a class of the gallery, 0 to {classes - 1} "
                                                                               "(GET /api/indexes lists them)")))
        start = time.perf_counter()
        if image is not None and image.filename:
            data, image_name = await image.read(), shown(image.filename)  # echoed in errors: cut when long
            await image.close()
            if not data:
                raise HTTPException(400, f"{image_name}: the upload is empty")
            del image
            picture, preprocess_ms = await run_in_threadpool(self.prepare_upload, data, image_name)
            del data
            query = None
        elif query_id is not None:
            query = self.query_record(query_id)
            picture, preprocess_ms = await run_in_threadpool(self.prepare_query, query_id)
        else:
            raise HTTPException(400, "send an image (multipart field 'image') or a query_id from the query set")
        decode_ms = (time.perf_counter() - start) * 1000
        body = await run_in_threadpool(self.answer, picture, k, index, query, class_label)
        body["timings_ms"] = {"decode": decode_ms - preprocess_ms, "preprocess": preprocess_ms, **body["timings_ms"]}
        return body

    async def warm_up(self) -> None:
        """One request's path before the first real one: the thread pool, Pillow's decoder, the model and the
        default index pay their first-call costs here, not on the first request's timings."""
        sample = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(sample, "JPEG")
        picture, _ = await run_in_threadpool(self.prepare_upload, sample.getvalue(), "warm-up.jpg")
        await run_in_threadpool(self.answer, picture, self.default_k, self.retriever.default_index, None)


async def imgret_error(request: Request, error: ImgretError):  # a bad k or index name: one line, no trace
    return JSONResponse({"detail": str(error)}, status_code=400)


async def unexpected(request: Request, error: Exception):
    log.exception("while answering %s %s", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error ({type(error).__name__}); see the server's log"}, status_code=500)


def create_app(retriever: Retriever, settings: ServeSettings) -> FastAPI:
    demo = Demo(retriever, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await demo.warm_up()
        yield

    app = FastAPI(title="imgret", version="1", lifespan=lifespan,
                  description="Image retrieval: a query image in, its nearest gallery images out, with what each "
                              "stage cost and what the approximate index missed against exact search.")
    app.state.demo = demo  # what the routes answer with (its settings, its decode budget)
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    app.add_exception_handler(ImgretError, imgret_error)
    app.add_exception_handler(Exception, unexpected)
    jpeg = {200: {"content": {"image/jpeg": {}}}}
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(demo.index_page)
    app.get("/api/health")(demo.health)
    app.get("/api/indexes")(demo.indexes)
    app.get("/api/queries/random")(demo.random_query)
    app.get("/api/thumbnails/{gallery_id}", responses=jpeg)(demo.thumbnail)
    app.get("/api/queries/{query_id}/thumbnail", responses=jpeg)(demo.query_thumbnail)
    app.post("/api/search")(demo.search)
    return app
