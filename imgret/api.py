"""The public library API: open a store and its indexes, embed images, search.

The pipeline (`imgret.run`), the benchmark and the web server (`imgret.serve`) all go through here, so
preprocessing, index loading and search are each written once:

    from imgret import api
    retriever = api.open_retriever(settings, data, [method])  # stores and indexes reused or built
    rows = retriever.embedder.embed([api.load_image("cat.jpg")])
    found = retriever.search(rows, k=10, index=retriever.default_index)
    exact = retriever.exact(rows, k=10)
    [retriever.describe(i) for i in found.ids[0]]      # id, path, label, class_name

Below `open_*`, everything takes plain values (an Encoder, an EmbeddingStore, a method's settings), not the
whole configuration.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from imgret.embed.backend_choice import with_backend
from imgret.embed.backends import precision_context
from imgret.embed.extract import Embeddings, backend_forward, ensure_embeddings, ensure_stores
from imgret.embed.loop import EmbeddingModule, normalised_rows
from imgret.embed.resolve import resolve_device, resolve_precision
from imgret.embed.models import Encoder, build_encoder
from imgret.embed.options import ExtractSettings
from imgret.embed.preprocess import DEFAULT_DECODER
from imgret.embed.store import EmbeddingStore
from imgret.errors import ConfigError, allowed, bad_value
from imgret.index.base import BuiltIndex, SearchIndex
from imgret.index.brute import BruteForceIndex
from imgret.index.build import build_index
from imgret.index.filters import RowFilter, RowKeys, label_filter
from imgret.index.methods import METHODS, MethodSettings, execution_params, is_exact, validate_search
from imgret.sources.base import ImageSet, ImagesToEmbed, ReadyVectors, Splits
from imgret.sources.decode import DEFAULT_MAX_IMAGE_PIXELS, open_image

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- stores and indexes

def open_stores(settings: ExtractSettings, provided: ImagesToEmbed | ReadyVectors) -> Embeddings:
    """The gallery and query stores of a run, reused from the cache or made: extracted from the images an image
    source provides, or written from the vectors a vector source plans (`provide` in imgret.sources.registry)."""
    if isinstance(provided, ImagesToEmbed):
        return ensure_embeddings(provided.splits, settings)
    from imgret.embed.vector_stores import ensure_vector_stores

    stores = ensure_vector_stores(provided.data, provided.seed, settings.cache_dir)
    if provided.source.has_reference:  # a file that carries its own neighbours: do they agree with imgret's?
        from imgret.measure.reference import reference_check

        found = reference_check(provided.data, stores.gallery, stores.queries) or {}
        stores = replace(stores, checks={f"reference_{key}": str(value) for key, value in found.items()})
    return stores


def open_gallery(settings: ExtractSettings, gallery: ImageSet) -> EmbeddingStore:
    """The gallery's store alone, reused or extracted (a server embeds its queries as they come)."""
    stores, _ = ensure_stores((gallery,), settings)
    return stores[gallery.split]


def open_index(settings: MethodSettings | Mapping, gallery: EmbeddingStore, cache_dir: Path | None, device: str = "cpu"
               ) -> BuiltIndex:
    """The index `settings` configure over a store: loaded from the index cache (keyed by the store), or built and
    saved."""
    return build_index(settings, np.ascontiguousarray(gallery.vectors), cache_dir, gallery.path.name, device,
                       RowKeys.of(gallery.labels))


# --------------------------------------------------------------------------- embedding

def load_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image as extraction reads it (`BadImage` says why a file cannot be one)."""
    return open_image(str(path), max_pixels)


class Embedder:
    """Images in, L2-normalised rows out: the same transform, module, precision and normalisation as
    extraction (`EmbeddingModule`), without Lightning. A row embedded here matches the store's row of that image."""

    def __init__(self, encoder: Encoder, device: str = "cpu", precision: str = "32-true", channels_last: bool = True,
                 decoder: str = DEFAULT_DECODER, forward=None):
        self.name = encoder.name
        self.description = encoder.description
        self.preprocessing = encoder.preprocessing(decoder)
        self.module = EmbeddingModule(encoder.network, self.preprocessing.mean, self.preprocessing.std,
                                      channels_last, forward).to(device).eval()
        self.device = device
        self.forward = forward  # None: PyTorch eager
        # another backend runs at its own precision (imgret.embed.backends): no autocast around it
        self.precision = precision if forward is None else "32-true"

    @classmethod
    def from_settings(cls, settings: ExtractSettings, encoder: Encoder | None = None, gallery=None) -> "Embedder":
        """The extraction's model (or `encoder`, already built from it), device, precision, backend, memory format
        and decoder. `gallery` (its ImageSet): what int8 calibrated on, to find the very model the store used."""
        device = resolve_device(settings.device)
        encoder = encoder or build_encoder(settings.model, settings.seed)
        # auto: the backend the gallery's store was made by (without a gallery to check on, PyTorch eager)
        settings = with_backend(settings, gallery) if gallery is not None else \
            replace(settings, backend="torch") if settings.backend == "auto" else settings
        forward = backend_forward(settings, encoder, gallery) if settings.backend != "torch" else None
        return cls(encoder, device, resolve_precision(settings, device), settings.channels_last, settings.decoder,
                   forward)

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The loader's half of the preprocessing (resize, crop) as one uint8 batch, as extraction makes it."""
        return self.preprocessing.batch([self.preprocessing.from_image(image) for image in images])

    def embed_prepared(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), precision_context(self.precision, self.device):
            return normalised_rows(self.module.embed(batch.to(self.device)))

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_prepared(self.prepare(images))


# --------------------------------------------------------------------------- search

@dataclass(frozen=True)
class IndexChoice:
    """One searchable setting: a built index searched at the run's query parameters or at a variant's."""

    name: str  # what the page and the API call it: "flat", "ivf nprobe=16"
    method: str
    setting: dict  # the method's parameters that matter, build and query
    built: BuiltIndex
    searcher: SearchIndex

    @property
    def exact(self) -> bool:
        return is_exact(self.method)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.searcher.search(vectors, k)


def _setting(settings: MethodSettings) -> dict:
    method = settings.method
    return {key: settings.get(key) for key in (*method.build_params, *method.query_params)
            if settings.get(key) is not None and key not in ("train_size", *execution_params())}


def index_choices(settings: MethodSettings | Mapping, built: BuiltIndex, variants: dict[str, Sequence[int]] | None = None
                  ) -> list[IndexChoice]:
    """The settings offered for one built index: one per value of its method's variant parameter in `variants`
    (values it cannot run, such as nprobe above nlist, left out), or the method's own setting."""
    settings = MethodSettings.of(settings)
    method = settings.method
    setting = _setting(settings)
    param = method.variant_param
    values = [v for v in (variants or {}).get(param) or [] if param
              and method.invalid_combination(settings.replaced(**{param: v})) is None]
    if not values:
        return [IndexChoice(method.choice_label(setting), method.name, setting, built, built.index)]
    return [IndexChoice(method.choice_label({**setting, param: value}), method.name, {**setting, param: int(value)},
                        built, built.at({param: int(value)}))
            for value in values]


@dataclass(frozen=True)
class Neighbours:
    ids: np.ndarray  # (queries, k) gallery rows, best first; -1 where an approximate index found fewer than k
    scores: np.ndarray  # cosine similarity of each
    seconds: float


@dataclass
class Retriever:
    """One gallery store, the indexes built over it, the encoder that made it, and the exact reference."""

    gallery: EmbeddingStore
    choices: Sequence[IndexChoice]
    embedder: Embedder | None = None
    class_names: Sequence[str] = ()  # label -> class name, as the source lists them (wnids)
    titles: dict = field(default_factory=dict)  # class name -> what a person calls it
    queries: ImageSet | None = None  # images to pick a query from
    reference: BruteForceIndex = field(init=False)

    def __post_init__(self):
        self.indexes = {choice.name: choice for choice in self.choices}
        if len(self.indexes) != len(self.choices):
            raise ConfigError(f"two indexes have the same name: {[c.name for c in self.choices]}")
        self.reference = BruteForceIndex(self.gallery.vectors)  # exact cosine, for the recall of every answer
        self.root = dataset_root([*self.gallery.paths, *(self.queries.paths if self.queries is not None else ())])

    @property
    def default_index(self) -> str:
        return self.choices[0].name

    def check(self, k, index: str) -> IndexChoice:
        if index not in self.indexes:
            raise bad_value("index", index, f"one of {allowed(self.indexes)}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(self.gallery):
            raise bad_value("k", k, f"a whole number from 1 to the gallery size ({len(self.gallery)})")
        return self.indexes[index]

    def class_filter(self, vectors: np.ndarray, class_label: int) -> RowFilter:
        """Each of these query vectors may return only gallery rows of `class_label`."""
        return label_filter(np.asarray(self.gallery.labels), np.full(len(vectors), class_label))

    def search(self, vectors: np.ndarray, k: int, index: str, class_label: int | None = None) -> Neighbours:
        """The index's k nearest rows, or, with `class_label`, its k nearest of that class (the method's own filter
        where it has one, else a deeper search post-filtered: `filter_mode`)."""
        choice = self.check(k, index)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        start = time.perf_counter()
        if class_label is None:
            scores, ids = choice.search(vectors, k)
        else:
            built = choice.built
            scores, ids = built.search_filtered(vectors, k, built.method.query_setting(choice.setting),
                                                max(1, torch.get_num_threads()), self.class_filter(vectors, class_label),
                                                np.arange(len(vectors)))
        return Neighbours(ids, scores, time.perf_counter() - start)

    def exact(self, vectors: np.ndarray, k: int, class_label: int | None = None) -> Neighbours:
        """The exact k nearest rows (of `class_label` only, when given), by brute force over them."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        start = time.perf_counter()
        if class_label is None:
            scores, ids = self.reference.search(vectors, k)
        else:
            scores, ids = METHODS["brute"].search_filtered(self.gallery.vectors, vectors, k, {}, 1,
                                                           self.class_filter(vectors, class_label),
                                                           np.arange(len(vectors)))
        return Neighbours(ids, scores, time.perf_counter() - start)

    def warm_up(self, k: int = 10) -> None:
        """One embedding and one search per index: first calls allocate, pick kernels and start threads
        (tens of milliseconds), which would otherwise land on the first person's request."""
        k = min(k, len(self.gallery))
        vector = self.embedder.embed([Image.new("RGB", (64, 64), (128, 128, 128))]) if self.embedder \
            else np.asarray(self.gallery.vectors[:1])
        for name in self.indexes:
            self.search(vector, k, name)
        self.exact(vector, k)

    def class_name(self, label: int) -> str:
        if 0 <= label < len(self.class_names):
            name = self.class_names[label]
            return self.titles.get(name, name)
        return str(label)

    def describe(self, row: int) -> dict:
        """A gallery row as people see it: its path relative to the dataset's root (an answer never carries the
        server's own file layout)."""
        label = int(self.gallery.labels[row])
        return {"id": int(row), "path": self.relative_path(self.gallery.paths[row]), "label": label,
                "class_name": self.class_name(label)}

    def relative_path(self, path: str) -> str:
        return os.path.relpath(path, self.root) if self.root and os.path.isabs(path) else path


def dataset_root(paths: Sequence[str]) -> str | None:
    """The folder every absolute path lies under (Tiny-ImageNet: the folder that holds train/ and val/), or None
    when there are none (generated images: their addresses hold no file layout)."""
    folders = {os.path.dirname(path) for path in paths if os.path.isabs(path)}
    return os.path.commonpath(sorted(folders)) if folders else None


def open_retriever(settings: ExtractSettings, data, methods: Sequence, variants: dict[str, Sequence[int]] | None = None,
                   splits: Splits | None = None) -> Retriever:
    """A Retriever over the gallery of the image source `data` (its settings; an upload must be embedded by the same
    model), extracted as `settings` say, with an index per method config, each reused from the index cache or
    built, and its query variants."""
    from imgret.sources.registry import has_model, load_splits, registry

    if not has_model(data):
        images = [name for name in registry() if has_model({"name": name})]
        raise bad_value("data", data.name, f"an image source ({', '.join(images)}): queries are images, embedded by "
                        "the model that made the gallery")
    splits = splits or load_splits(data, settings.seed)
    methods = [MethodSettings.of(method) for method in methods]
    for method in methods:
        validate_search(method, 1, len(splits.gallery))
    gallery = open_gallery(settings, splits.gallery)
    device = resolve_device(settings.device)
    choices = []
    for method in methods:
        built = open_index(method, gallery, settings.cache_dir, device)
        choices += index_choices(method, built, variants)
    embedder = Embedder.from_settings(settings, gallery=splits.gallery)
    return Retriever(gallery, choices, embedder, splits.gallery.class_names, dict(splits.titles), splits.queries)
