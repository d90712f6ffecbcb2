"""The pieces of Lightning's prediction loop that extraction runs: the images as a Dataset (bad images reported, not
raised, when skipped), the model as a LightningModule (PyTorch eager or a backend's forward), the writer that
streams each batch's normalised rows to this rank's part of a staged store, and the progress bar."""
from __future__ import annotations

import sys

import logging
import uuid
from pathlib import Path

import faiss
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import Dataset

from imgret.embed.backends import NormalisedNetwork
from imgret.embed.preprocess import Preprocessing
from imgret.embed.store import StagedStore
from imgret.errors import BadImage
from imgret.rusage import CpuUse
from imgret.sources.base import ImageSet
from imgret.sources.decode import DEFAULT_MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)


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
        from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

        # Lightning's own bar, counting batches from its first line (a unit set after it was drawn shows "it/s" once)
        return Tqdm(desc=self.label, position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT, unit="batch")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        """Lightning's, without its "DataLoader N" suffix and without drawing the bar again at each batch's start:
        the bar is drawn once per update (a captured log held each update twice)."""
        if not self.has_dataloader_changed(dataloader_idx):
            return
        from pytorch_lightning.callbacks.progress.tqdm_progress import convert_inf

        self.predict_progress_bar.set_description(self.label, refresh=False)
        self.predict_progress_bar.reset(total=convert_inf(self.total_predict_batches_current_dataloader))


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
