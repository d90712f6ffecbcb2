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
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader, Dataset

from imgret.embed import launch
from imgret.allocator import kept_freed_memory
from imgret.cache import file_lock
from imgret.rusage import CpuUse
from imgret.sources.base import ImageSet, Splits
from imgret.sources.decode import DEFAULT_MAX_IMAGE_PIXELS
from imgret.errors import BadImage, DataUnavailable, free_space_check
from imgret.embed.models import Encoder, build_encoder, output_dim
from imgret.embed.options import ExtractSettings
from imgret.embed.backend_choice import with_backend
from imgret.embed.backends import NormalisedNetwork, make_forward, precision_context
from imgret.embed.resolve import (resolve_device, resolve_devices, resolve_num_workers, resolve_precision,
                                  store_encoder_description)
from imgret.embed.preprocess import Preprocessing
from imgret.embed.store import Embeddings, EmbeddingStore, StagedStore, remove_stale_staging, store_dir, store_key

log = logging.getLogger(__name__)
# Lightning announces the accelerator and advertises a logger on every Trainer: once per split per job.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)



class ImageDataset(Dataset):
    """The images `indices` of a set, each loaded by `preprocessing` (the decoder's per-image half); an unusable
    image yields (None, index, why) when skipping bad images."""

    def __init__(self, image_set: ImageSet, preprocessing: Preprocessing, indices: np.ndarray | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, skip_bad: bool = True):
        self.image_set = image_set
        self.preprocessing = preprocessing
        self.indices = np.arange(len(image_set)) if indices is None else np.asarray(indices)
        self.max_pixels = max_pixels
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = int(self.indices[position])
        try:
            return self.preprocessing.load(self.image_set.paths[index], self.max_pixels), index, None
        except BadImage as error:
            if not self.skip_bad:
                raise BadImage(error.path, f"{error.reason} (data.on_bad_image=fail; skip leaves such images out)") \
                    from error
            return None, index, f"{error.path}\t{error.reason}"

    def collate(self, items):
        """A batch of the usable images at the model's size, their indices, and (index, why) for each unusable one."""
        usable = [(image, index) for image, index, _ in items if image is not None]
        images = self.preprocessing.batch([image for image, _ in usable])
        indices = torch.tensor([index for _, index in usable], dtype=torch.int64)
        return images, indices, [(index, why) for image, index, why in items if image is None]


class EmbeddingModule(pl.LightningModule):
    """uint8 image batches in, features out, through PyTorch eager (`NormalisedNetwork`) or the backend's
    `forward` (imgret.embed.backends) when one is given."""

    def __init__(self, network: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False,
                 forward=None):
        super().__init__()
        self.normalised = NormalisedNetwork(network, mean, std, channels_last)
        self.backend_forward = forward

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in, features out (not yet normalised): every use of the model goes through here."""
        if self.backend_forward is not None:
            return self.backend_forward(images)
        return self.normalised(images)

    def predict_step(self, batch, batch_idx):
        images, indices, bad = batch
        if len(indices) == 0:  # every image of this batch was unusable
            return indices, None, bad
        return indices, self.embed(images), bad


def normalised_rows(features: torch.Tensor) -> np.ndarray:
    """Features as the store holds them: float32 rows of unit length, so inner product is cosine."""
    rows = np.ascontiguousarray(features.detach().float().cpu().numpy(), dtype=np.float32)
    faiss.normalize_L2(rows)
    return rows


class ExtractionProgressBar(TQDMProgressBar):
    """Lightning's bar, saying what it counts ("gallery · resnet18, batches of 64") instead of "Predicting DataLoader 0"."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    @property
    def predict_description(self) -> str:
        return self.label

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit = "batch"
        return bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self.predict_progress_bar.set_description(self.label)


class EmbeddingStoreWriter(BasePredictionWriter):
    """Streams each batch's normalised rows, and its unusable images, to this rank's part of a staged store.

    Each batch is flushed as it is written, so a killed extraction leaves whole rows for the next attempt."""

    def __init__(self, final_dir: Path, dataset: "ImageDataset"):
        super().__init__(write_interval="batch")
        self.cpu_use: CpuUse | None = None  # what the prediction loop used, once it has run
        self.final_dir = final_dir
        self.dataset = dataset
        self.staged: StagedStore | None = None
        self.dim: int | None = None
        self._files = None

    def setup(self, trainer, pl_module, stage):
        # Rank 0 says which images are left (the distributed sampler is made after this hook, from the dataset)
        # and names the attempt: every rank writes into the store's staging folder under that name.
        self.dataset.indices = trainer.strategy.broadcast(self.dataset.indices, src=0)
        attempt = trainer.strategy.broadcast(uuid.uuid4().hex[:12], src=0)
        self.staged = StagedStore(self.final_dir, attempt)
        self._files = self.staged.open_part(trainer.global_rank)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        indices, features, bad = prediction
        vectors_file, index_file, bad_file = self._files
        if features is not None:
            rows = normalised_rows(features)
            if self.dim is None:
                self.dim = rows.shape[1]
                self.staged.record_dim(self.dim)
            vectors_file.write(rows.tobytes())
            index_file.write(indices.cpu().numpy().astype(np.int64).tobytes())
        for index, why in bad:
            log.warning("skipping a bad image: %s", why.replace("\t", ": "))
            bad_file.write(f"{index}\t{why}\n".encode())
        for handle in self._files:
            handle.flush()

    def on_predict_end(self, trainer, pl_module):
        # Every rank's part must be complete before rank 0 merges them: close, then wait for the others.
        self._close()
        trainer.strategy.barrier("imgret-embedding-store-parts")

    def teardown(self, trainer, pl_module, stage):
        self._close()  # also after a failure, which skips on_predict_end

    def _close(self):
        if self._files:
            for handle in self._files:
                handle.close()
            self._files = None


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


def forward_latency_ms(encoder: Encoder, image_set: ImageSet, settings: ExtractSettings, device: str,
                       forward=None) -> float:
    """Median model-forward time at batch size 1 (the seed's measure) through the extraction's module, backend
    and precision: preprocessing excluded."""
    count = max(1, min(settings.latency_images, len(image_set)))
    preprocessing = encoder.preprocessing(settings.decoder)
    inputs = []
    for i in np.unique(np.linspace(0, len(image_set) - 1, count).astype(int)):
        with contextlib.suppress(BadImage):  # extraction reports unusable images; the probe only needs good ones
            image = preprocessing.load(image_set.paths[int(i)], settings.max_image_pixels)
            inputs.append(preprocessing.batch([image]).to(device))
    if not inputs:
        raise DataUnavailable(f"none of the {count} {image_set.split} images sampled for the latency probe could be "
                              "read: is this the right folder?")
    module = EmbeddingModule(encoder.network, preprocessing.mean, preprocessing.std, settings.channels_last,
                             forward).to(device).eval()
    times = []
    with torch.inference_mode(), precision_context(resolve_precision(settings, device) if forward is None else "32-true",
                                                   device):
        for x in inputs[: min(5, count)]:  # warm-up: first calls allocate and pick kernels
            module.embed(x)
        for x in inputs:
            start = time.perf_counter()
            module.embed(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_ranks(settings: ExtractSettings, image_set: ImageSet, final_dir: Path, devices: int, forward=None):
    """Ranks 1..devices-1 of a one-machine extraction, each a process running only the extraction
    (`python -m imgret.embed.extract SPEC`), and this process as rank 0 among them.

    Lightning's own launcher would start the whole command again in every rank (a second MLflow run, a
    second sweep under `-m`); these ranks get the extraction's settings and the image set, nothing else."""
    spec = Path(tempfile.mkdtemp(prefix="imgret-ranks-")) / "spec.json"
    (spec.parent / "paths.txt").write_text("\n".join(image_set.paths))
    np.save(spec.parent / "labels.npy", image_set.labels)
    spec.write_text(json.dumps({"settings": settings.to_json(), "final_dir": str(final_dir), "dataset": image_set.dataset,
                                "split": image_set.split, "class_names": list(image_set.class_names),
                                "source_id": image_set.source_id,
                                # the backend's model as rank 0 converted (and, for int8, calibrated) it
                                "model_file": str(getattr(forward, "model_file", None) or "") or None}))
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(devices), "NODE_RANK": "0"}
    ranks = [subprocess.Popen([sys.executable, "-m", "imgret.embed.extract", str(spec)],
                              env={**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(1, devices)]
    saved = {key: os.environ.get(key) for key in (*shared, "RANK", "LOCAL_RANK")}
    os.environ.update({**shared, "RANK": "0", "LOCAL_RANK": "0"})  # Lightning: the ranks exist, join them
    failed = True
    try:
        yield
        failed = False
    except BaseException:
        for rank in ranks:
            rank.kill()
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next extraction starts ranks of its own
        codes = [rank.wait(timeout=600) for rank in ranks]
        shutil.rmtree(spec.parent, ignore_errors=True)
        if any(codes) and not failed:  # after a failure here, the ranks were killed: report that failure instead
            raise RuntimeError(f"extraction ranks 1..{devices - 1} exited with {codes}; see their output above")


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
