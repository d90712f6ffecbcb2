"""Extraction stage: images -> embedding store, through Lightning's prediction loop.

`ensure_embeddings` returns the gallery and query stores, reusing a cached store whenever its key
matches (then no model is built at all) and extracting only what is missing. Each process (rank)
streams its L2-normalised rows to its own part file, so memory stays flat and the same writer works
under DDP; the store is committed only once every row is in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from imgret.embed import launch
from imgret.allocator import kept_freed_memory
from imgret.cache import file_lock
from imgret.rusage import CpuUse
from imgret.sources.base import ImageSet, Splits
from imgret.errors import DataUnavailable, free_space_check
from imgret.embed.models import Encoder, build_encoder, output_dim
from imgret.embed.options import ExtractSettings
from imgret.embed.backend_choice import with_backend
from imgret.embed.backends import NormalisedNetwork, make_forward
from imgret.embed.latency import forward_latency_ms
from imgret.embed.loop import EmbeddingModule, EmbeddingStoreWriter, ExtractionProgressBar, ImageDataset
from imgret.embed.ranks import local_ranks
from imgret.embed.resolve import (resolve_device, resolve_devices, resolve_num_workers, resolve_precision,
                                  store_encoder_description)
from imgret.embed.store import Embeddings, EmbeddingStore, StagedStore, remove_stale_staging, store_dir, store_key

log = logging.getLogger(__name__)
# Lightning warns on every Trainer wherever Slurm's srun is installed but imgret runs outside a Slurm job: a machine
# with Slurm is no sign that this run meant to use it (under srun, Lightning reads Slurm's environment itself).
warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
# Lightning announces the accelerator and advertises a logger on every Trainer: once per split per job.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)



def ensure_embeddings(splits: Splits, settings: ExtractSettings) -> Embeddings:
    stores, extracted = ensure_stores((splits.gallery, splits.queries), settings)
    return Embeddings(stores["gallery"], stores["queries"], extracted)


def ensure_stores(image_sets, settings: ExtractSettings) -> tuple[dict[str, EmbeddingStore], tuple[str, ...]]:
    """The store of each image set (by split), reused from the cache or extracted; and the splits extracted."""
    settings = with_backend(settings, next((s for s in image_sets if s.split == "gallery"), image_sets[0]))
    description = store_encoder_description(settings)
    cache_dir = settings.cache_dir
    wanted = {s.split: (s, store_key(s, description)) for s in image_sets}
    stores = {split: EmbeddingStore.open(store_dir(cache_dir, key)) for split, (_, key) in wanted.items()}
    missing = [split for split, store in stores.items() if store is None]
    extracted = []
    if missing:
        rank = launch.process_rank()
        if rank == 0:  # before any work: a store is written twice over (its parts, then merged) before it commits
            rows = sum(len(wanted[split][0]) for split in missing)
            cache_dir.mkdir(parents=True, exist_ok=True)
            free_space_check(cache_dir, 2 * rows * (4 * output_dim(settings.model) + 8), "paths.cache",
                             f"the embedding stores of {rows:,} images (written in parts, then merged)")
        encoder = build_encoder(settings.model, settings.seed)
        device = resolve_device(settings.device)
        gallery = next((s for s in image_sets if s.split == "gallery"), image_sets[0])
        forward = backend_forward(settings, encoder, gallery)
        latency_ms = forward_latency_ms(encoder, wanted[missing[0]][0], settings, device, forward) \
            if rank == 0 else float("nan")
        with kept_freed_memory():  # one block for every split: the queries reuse the pages the gallery faulted in
            for split in missing:
                image_set, key = wanted[split]
                final_dir = store_dir(cache_dir, key)
                # One extraction per store at a time: a concurrent run waits here, then finds the store made. Under
                # a launcher only rank 0 takes the lock (the others must join its prediction loop, not wait for it).
                with file_lock(final_dir, f"the {split} embedding store {final_dir.name}") if rank == 0 \
                        else contextlib.nullcontext():
                    stores[split] = EmbeddingStore.open(final_dir) if rank == 0 else None
                    if stores[split] is None:
                        remove_stale_staging(final_dir)
                        stores[split] = extract_store(encoder, image_set, key, settings, latency_ms, forward=forward)
                        extracted.append(split)
    else:
        log.info("reusing embedding stores %s", ", ".join(str(store.path) for store in stores.values()))
    return stores, tuple(extracted)


def fp32_reference_stores(settings: ExtractSettings, splits: Splits) -> Embeddings | None:
    """The stores of the same images and model made by PyTorch eager in fp32, when the cache holds them: what
    a run at another precision or backend is compared with (None for such a run itself, or when there are none)."""
    if settings.backend == "torch" and resolve_precision(settings, resolve_device(settings.device)) == "32-true":
        return None
    description = store_encoder_description(dataclasses.replace(settings, precision="32-true", backend="torch"))
    stores = [EmbeddingStore.open(store_dir(settings.cache_dir, store_key(image_set, description)))
              for image_set in (splits.gallery, splits.queries)]
    return Embeddings(stores[0], stores[1], ()) if all(stores) else None


def backend_forward(settings: ExtractSettings, encoder: Encoder, gallery: ImageSet):
    """The forward of `extract.backend` (None: PyTorch eager); int8 calibrates on `gallery`'s images."""
    preprocessing = encoder.preprocessing(settings.decoder)
    module = NormalisedNetwork(encoder.network, preprocessing.mean, preprocessing.std, settings.channels_last)
    return make_forward(settings.backend, resolve_precision(settings, resolve_device(settings.device)), module,
                        store_encoder_description(settings), settings.cache_dir, gallery, preprocessing,
                        settings.max_image_pixels)


def predict_rows(encoder: Encoder, image_set: ImageSet, todo: np.ndarray, final_dir: Path, settings: ExtractSettings,
                 callbacks: Sequence[pl.Callback] = (), forward=None) -> tuple:
    """Run Lightning's prediction loop over the images `todo` (rank 0's choice, broadcast to every rank),
    streaming rows into the store's staging folder. Returns (writer, seconds, is_global_zero)."""
    device = resolve_device(settings.device)
    devices = resolve_devices(settings.devices, device)
    num_nodes = int(settings.num_nodes)
    start_ranks = devices * num_nodes > 1 and not launch.launched_externally()
    threads = torch.get_num_threads()
    if device == "cpu" and devices > 1:  # processes share the cores rather than each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    preprocessing = encoder.preprocessing(settings.decoder)
    dataset = ImageDataset(image_set, preprocessing, todo, settings.max_image_pixels, settings.skip_bad_images)
    writer = EmbeddingStoreWriter(final_dir, dataset)
    num_workers = resolve_num_workers(settings.num_workers, device)
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=dataset.collate,
                        pin_memory=device == "cuda",  # page-locked buffers let the host-to-GPU copy run asynchronously
                        persistent_workers=False)
    try:
        with local_ranks(settings, image_set, final_dir, devices, forward) if start_ranks else contextlib.nullcontext():
            trainer = pl.Trainer(
                accelerator="gpu" if device == "cuda" else "cpu",
                devices=devices,
                num_nodes=num_nodes,
                strategy=str(settings.strategy),
                # another backend runs its own precision: Lightning's autocast would only wrap the calls into it
                precision=resolve_precision(settings, device) if forward is None else "32-true",
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=settings.progress,
                inference_mode=True,
                callbacks=[writer, *callbacks, *([ExtractionProgressBar(
                    f"{image_set.split} · {encoder.name}, batches of {settings.batch_size}")] if settings.progress else [])],
            )
            if trainer.is_global_zero:
                log.info("extracting %d %s images with %s into %s (%d process%s)", len(todo), image_set.split,
                         encoder.name, final_dir, devices * num_nodes, "es" if devices * num_nodes > 1 else "")
            start, used = time.perf_counter(), CpuUse.now()
            module = EmbeddingModule(encoder.network, preprocessing.mean, preprocessing.std,
                                     settings.channels_last, forward)
            with kept_freed_memory():  # each batch reuses the memory the last one freed (imgret.allocator)
                trainer.predict(module, dataloaders=loader, return_predictions=False)
            writer.cpu_use = CpuUse.now() - used
            return writer, time.perf_counter() - start, trainer.is_global_zero
    finally:
        torch.set_num_threads(threads)


def wait_for_commit(final_dir: Path, timeout_s: float = 3600) -> EmbeddingStore:
    """Ranks other than 0: the store exists once rank 0 has merged and committed it."""
    deadline = time.monotonic() + timeout_s
    while not (final_dir / "meta.json").is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not commit {final_dir} within {timeout_s:.0f} s")
        time.sleep(0.2)
    return EmbeddingStore(final_dir)


def extract_store(encoder: Encoder, image_set: ImageSet, key: dict, settings: ExtractSettings,
                  latency_ms: float, callbacks: Sequence[pl.Callback] = (), forward=None) -> EmbeddingStore:
    """Extract the images a killed earlier attempt did not finish, then merge and commit the store.
    Rank 0 holds the store's lock, decides what is left to do, merges and commits; other ranks (started by
    a launcher) extract their share and wait for the commit. `callbacks` join the prediction loop's (the
    benchmark times the forward alone between its batches)."""
    final_dir = store_dir(settings.cache_dir, key)
    device = resolve_device(settings.device)
    count = len(image_set)
    rank = launch.process_rank()
    if rank != 0:  # never touch the staging folder: rank 0 validates it, and broadcasts what is left to do
        predict_rows(encoder, image_set, np.empty(0, dtype=np.int64), final_dir, settings, forward=forward)
        return wait_for_commit(final_dir)
    progress = StagedStore(final_dir, "resume").resume(count)
    finished = np.union1d(progress.done, np.fromiter(progress.bad, dtype=np.int64, count=len(progress.bad)))
    todo = np.setdiff1d(np.arange(count), finished)
    if finished.size:
        log.info("resuming the %s store %s: %d images done by an earlier attempt, %d to go", image_set.split,
                 final_dir.name, finished.size, todo.size)
    writer, seconds = None, 0.0
    if todo.size or launch.launched_externally():  # under a launcher every rank must join the loop
        writer, seconds, _ = predict_rows(encoder, image_set, todo, final_dir, settings, callbacks, forward)
    staged = StagedStore(final_dir, "merge")
    dim = (writer.dim if writer else None) or progress.dim or staged.resume(count).dim
    if dim is None:
        raise DataUnavailable(f"none of the {count} {image_set.split} images could be used; see the warnings above")
    rows = staged.merge_parts(image_set, dim)
    devices = resolve_devices(settings.devices, device) * int(settings.num_nodes)
    meta = {
        "key": key,
        "count": rows,
        "dim": dim,
        "image_count": count,
        "bad_images": count - rows,
        "extraction": {
            "seconds": seconds,
            "images": int(todo.size),
            "resumed_rows": int(progress.done.size),
            "images_per_s": todo.size / seconds if seconds > 0 else None,
            "ms_per_image_batch1": latency_ms,
            "batch_size": settings.batch_size,
            "num_workers": resolve_num_workers(settings.num_workers, device),
            "device": device,
            "processes": devices,
            "precision": resolve_precision(settings, device),
            "threads": torch.get_num_threads(),
            **(writer.cpu_use.record() if writer and writer.cpu_use else {}),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return staged.commit(meta)


def worker_main(spec_path: str) -> None:
    """`python -m imgret.embed.extract SPEC`: one rank of an extraction that rank 0 started (see `local_ranks`)."""
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec_path).parent
    paths = (folder / "paths.txt").read_text().split("\n")
    image_set = ImageSet(spec["dataset"], spec["split"], tuple(paths), np.load(folder / "labels.npy"),
                         tuple(spec["class_names"]), spec["source_id"])
    settings = ExtractSettings.from_json(spec["settings"])
    forward = None
    if spec.get("model_file"):
        from imgret.embed.backends import OpenVinoForward

        threads = max(1, (os.cpu_count() or 1) // resolve_devices(settings.devices, "cpu"))
        forward = OpenVinoForward(spec["model_file"], resolve_precision(settings, "cpu"), threads, spec["model_file"])
    predict_rows(build_encoder(settings.model, settings.seed), image_set, np.empty(0, dtype=np.int64),
                 Path(spec["final_dir"]), settings, forward=forward)


if __name__ == "__main__":
    worker_main(sys.argv[1])
