"""Extraction stage: images -> embedding store, through Lightning's prediction loop.

`ensure_embeddings` returns the gallery and query stores, reusing a cached store whenever its key
matches (then no model is built at all) and extracting only what is missing. Each process (rank)
streams its L2-normalised rows to its own part file, so memory stays flat and the same writer works
under DDP; the store is committed only once every row is in.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from imgret.data import ImageSet, Splits
from imgret.errors import ConfigError
from imgret.models import Encoder, build_encoder, describe_encoder
from imgret.store import EmbeddingStore, StagedStore, store_dir, store_key

log = logging.getLogger(__name__)
# Lightning announces the accelerator and advertises a logger on every Trainer: once per split per job.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Embeddings:
    gallery: EmbeddingStore
    queries: EmbeddingStore
    extracted: tuple[str, ...]  # the splits this call extracted; the others came from the cache

    @property
    def timings(self) -> dict[str, float]:
        """Throughput over both splits and batch-1 latency, as measured when the stores were made."""
        metas = [self.gallery.meta, self.queries.meta]
        images = sum(m["count"] for m in metas)
        seconds = sum(m["extraction"]["seconds"] for m in metas)
        return {
            "extract_ms_per_image": self.gallery.meta["extraction"]["ms_per_image_batch1"],
            "extract_images_per_s": images / seconds,
        }


class ImageDataset(Dataset):
    def __init__(self, image_set: ImageSet, transform):
        self.image_set = image_set
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int):
        return self.transform(self.image_set.open(index)), index


class EmbeddingModule(pl.LightningModule):
    """uint8 image batches in, features out: the batch half of the encoder's preprocessing runs here."""

    def __init__(self, network: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False):
        super().__init__()
        # oneDNN's convolutions run faster on NHWC tensors (measured by `python -m imgret.bench`)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network = network.to(memory_format=self.memory_format)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def predict_step(self, batch, batch_idx):
        images, indices = batch
        # the same operations, in the same order, as ToTensor then Normalize on each image
        x = images.to(dtype=torch.float32, memory_format=self.memory_format).div_(255).sub_(self.mean).div_(self.std)
        return indices, self.network(x)


class EmbeddingStoreWriter(BasePredictionWriter):
    """Streams each batch's normalised rows to this rank's part of a staged store."""

    def __init__(self, final_dir: Path):
        super().__init__(write_interval="batch")
        self.final_dir = final_dir
        self.staged: StagedStore | None = None
        self.dim: int | None = None
        self._files = None

    def setup(self, trainer, pl_module, stage):
        # Every rank must write into the same staging folder: rank 0 names it.
        token = trainer.strategy.broadcast(uuid.uuid4().hex[:12], src=0)
        self.staged = StagedStore(self.final_dir, token)
        self._files = self.staged.open_part(trainer.global_rank)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        indices, features = prediction
        rows = np.ascontiguousarray(features.detach().float().cpu().numpy(), dtype=np.float32)
        faiss.normalize_L2(rows)
        self.dim = rows.shape[1]
        vectors_file, index_file = self._files
        vectors_file.write(rows.tobytes())
        index_file.write(indices.cpu().numpy().astype(np.int64).tobytes())

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


def ensure_embeddings(splits: Splits, cfg) -> Embeddings:
    description = describe_encoder(cfg.model, cfg.seed)
    cache_dir = Path(cfg.paths.cache)
    wanted = {s.split: (s, store_key(s, description)) for s in (splits.gallery, splits.queries)}
    stores = {split: EmbeddingStore.open(store_dir(cache_dir, key)) for split, (_, key) in wanted.items()}
    missing = [split for split, store in stores.items() if store is None]
    if missing:
        encoder = build_encoder(cfg.model, cfg.seed)
        device = resolve_device(cfg.device)
        latency_ms = forward_latency_ms(encoder, wanted[missing[0]][0], int(cfg.extract.latency_images), device)
        for split in missing:
            image_set, key = wanted[split]
            stores[split] = extract_store(encoder, image_set, key, cache_dir, cfg, latency_ms)
    else:
        log.info("reusing embedding stores %s and %s", stores["gallery"].path, stores["queries"].path)
    return Embeddings(stores["gallery"], stores["queries"], tuple(missing))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use device=cpu or device=auto")
    return device


def resolve_num_workers(num_workers, device: str) -> int:
    """`auto`: none on the CPU, where loader processes only take cores from the model (measured by the
    benchmark on 2 cores; the loading then runs between batches), up to 8 beside a GPU, which waits on them."""
    if num_workers == "auto":
        return min(8, os.cpu_count() or 1) if device == "cuda" else 0
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r} must be 'auto' or a whole number >= 0")
    return num_workers


def forward_latency_ms(encoder: Encoder, image_set: ImageSet, sample: int, device: str) -> float:
    """Median model-forward time at batch size 1 (the seed's measure): preprocessing excluded."""
    count = max(1, min(sample, len(image_set)))
    picks = np.linspace(0, len(image_set) - 1, count).astype(int)
    inputs = [encoder.transform(image_set.open(int(i))).unsqueeze(0).to(device) for i in picks]
    network = encoder.network.to(device)
    times = []
    with torch.inference_mode():
        for x in inputs[: min(5, count)]:  # warm-up: first calls allocate and pick kernels
            network(x)
        for x in inputs:
            start = time.perf_counter()
            network(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def extract_store(encoder: Encoder, image_set: ImageSet, key: dict, cache_dir: Path, cfg,
                  latency_ms: float) -> EmbeddingStore:
    final_dir = store_dir(cache_dir, key)
    device = resolve_device(cfg.device)
    writer = EmbeddingStoreWriter(final_dir)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        # mixed precision only where it pays: on a GPU (fp16 on these CPUs is emulated and slower)
        precision="16-mixed" if device == "cuda" and cfg.extract.get("amp", True) else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.extract.progress),
        inference_mode=True,
        callbacks=[writer],
    )
    image_transform, mean, std = encoder.split_transform()
    num_workers = resolve_num_workers(cfg.num_workers, device)
    loader = DataLoader(
        ImageDataset(image_set, image_transform),
        batch_size=int(cfg.batch_size),
        num_workers=num_workers,
        shuffle=False,
        pin_memory=device == "cuda",  # page-locked buffers let the host-to-GPU copy run asynchronously
        persistent_workers=False,
    )
    log.info("extracting %d %s images with %s into %s", len(image_set), image_set.split, encoder.name, final_dir)
    start = time.perf_counter()
    try:
        module = EmbeddingModule(encoder.network, mean, std, bool(cfg.extract.get("channels_last", True)))
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        seconds = time.perf_counter() - start
        if not trainer.is_global_zero:  # rank 0 merges and commits; the store appears when it is done
            return EmbeddingStore(final_dir)
        writer.staged.merge_parts(image_set, writer.dim, trainer.world_size)
        meta = {
            "key": key,
            "count": len(image_set),
            "dim": writer.dim,
            "extraction": {
                "seconds": seconds,
                "images_per_s": len(image_set) / seconds,
                "ms_per_image_batch1": latency_ms,
                "batch_size": int(cfg.batch_size),
                "num_workers": num_workers,
                "device": device,
                "threads": torch.get_num_threads(),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return writer.staged.commit(meta)
    finally:
        # The staging folder is shared by every rank: only rank 0, which merges it, may remove it.
        if trainer.is_global_zero and writer.staged is not None and writer.staged.staging.exists():
            writer.staged.discard()
