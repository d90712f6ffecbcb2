"""Shared fixtures: Hydra-composed configs with a temporary cache and MLflow store, and a small real
subset of the Tiny-ImageNet archive (the real images and layout, 4 classes)."""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
REAL_ARCHIVE = (PROJECT_ROOT / ".." / "shared" / "data" / "tiny-imagenet-200.zip").resolve()

SUBSET_CLASSES = 4
SUBSET_TRAIN_PER_CLASS = 12  # the second class has greyscale images among its first 12 (_9)
SUBSET_VAL_PER_CLASS = 3


def require_real_archive() -> Path:
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"the real Tiny-ImageNet archive is missing: expected {REAL_ARCHIVE} (see README, 'Data')")
    return REAL_ARCHIVE


def subset_zip(out: Path, classes: int, train_per_class: int, val_per_class: int) -> tuple[Path, str]:
    """A zip in the official layout holding real images of the first `classes` classes, and its sha256."""
    source = require_real_archive()
    prefix = "tiny-imagenet-200/"
    with zipfile.ZipFile(source) as real, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as subset:
        wnids = real.read(prefix + "wnids.txt").decode().split()[:classes]
        subset.writestr(prefix + "wnids.txt", "\n".join(wnids) + "\n")
        words = [line for line in real.read(prefix + "words.txt").decode().splitlines() if line.split("\t")[0] in wnids]
        subset.writestr(prefix + "words.txt", "\n".join(words) + "\n")
        for wnid in wnids:
            for n in range(train_per_class):
                name = f"{prefix}train/{wnid}/images/{wnid}_{n}.JPEG"
                subset.writestr(name, real.read(name))
        kept, taken = [], {w: 0 for w in wnids}
        for line in real.read(prefix + "val/val_annotations.txt").decode().splitlines():
            filename, wnid = line.split("\t")[:2]
            if wnid in taken and taken[wnid] < val_per_class:
                taken[wnid] += 1
                kept.append(line)
                subset.writestr(f"{prefix}val/images/{filename}", real.read(f"{prefix}val/images/{filename}"))
        subset.writestr(prefix + "val/val_annotations.txt", "\n".join(kept) + "\n")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    return out, f"sha256:{digest}"


@pytest.fixture(scope="session")
def tiny_subset_zip(tmp_path_factory) -> tuple[Path, str]:
    """A zip in the official layout holding real images of the first 4 classes, and its sha256 checksum."""
    return subset_zip(tmp_path_factory.mktemp("archive") / "tiny-subset.zip", SUBSET_CLASSES, SUBSET_TRAIN_PER_CLASS,
                      SUBSET_VAL_PER_CLASS)


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config with Hydra, writing caches and MLflow runs under this test's tmp_path."""

    def compose_cfg(*overrides: str):
        base = [
            f"paths.cache={tmp_path / 'cache'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
            f"tracking.artifact_root={tmp_path / 'mlruns' / 'artifacts'}",
            "extract.progress=false",
            "extract.latency_images=4",
            "search.latency_queries=50",
            "search.warmup_queries=5",
            "num_workers=0",
            # PyTorch eager, not auto's one-off comparison with OpenVINO in every new cache (tests/test_backend_choice.py)
            "extract.backend=torch",
        ]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=base + list(overrides))

    return compose_cfg


SYNTHETIC_FAST = ("data=synthetic", "model.pretrained=false", "model.image_size=32", "batch_size=16")


def clustered_vectors(n: int, dim: int, clusters: int, seed: int = 0, spread: float = 0.15) -> np.ndarray:
    """L2-normalised points around random centres: what IVF is built for, so its recall can drop."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    points = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def write_store(folder: Path, vectors: np.ndarray, labels: np.ndarray | None = None):
    """A committed embedding store holding `vectors` (as extraction would leave it, checksums included)."""
    from imgret.cache import describe_files
    from imgret.embed.store import DATA_FILES, META, EmbeddingStore

    folder.mkdir(parents=True)
    np.save(folder / "vectors.npy", np.asarray(vectors, dtype=np.float32))
    np.save(folder / "labels.npy", np.zeros(len(vectors), np.int64) if labels is None else labels)
    (folder / "paths.txt").write_text("\n".join(f"image-{i}" for i in range(len(vectors))))
    (folder / "bad_images.txt").write_text("")
    meta = {"key": {"split": folder.name}, "count": len(vectors), "dim": vectors.shape[1],
            "files": describe_files(folder, DATA_FILES)}
    (folder / META).write_text(__import__("json").dumps(meta))
    return EmbeddingStore.open(folder)


def write_images(folder: Path, classes=("a", "b"), per_class: int = 6) -> Path:
    """A class-per-folder tree of small PNGs, each a little different."""
    from PIL import Image

    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (i * 30 % 256, 40 * len(cls), 0)).save(folder / cls / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def real_stores(tmp_path_factory):
    """The gallery and query stores of real images (20 classes, 30 and 2 images each), extracted once per test session
    by the pipeline's own stores: in a folder every xdist worker of the session shares, the first to come writing the
    zip under a lock, the stores' own locks making the others wait for and open the same extraction."""
    from filelock import FileLock

    from imgret.api import open_stores
    from imgret.embed.options import ExtractSettings
    from imgret.sources.registry import provide

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "real_store"
    folder.mkdir(exist_ok=True)
    with FileLock(str(folder / "zip.lock")):
        if not (folder / "twenty.zip.sha256").is_file():
            archive, digest = subset_zip(folder / "twenty.zip", 20, 30, 2)
            (folder / "twenty.zip.sha256").write_text(digest)
    archive, digest = folder / "twenty.zip", (folder / "twenty.zip.sha256").read_text()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"data.archive={archive}", f"data.checksums=[{digest}]", "model=efficientnet_lite0",
            "model.image_size=112", f"paths.cache={folder / 'cache'}", "extract.progress=false",
            "extract.latency_images=2", "num_workers=0"])
    return open_stores(ExtractSettings.from_config(cfg), provide(cfg.data, cfg.seed))


@pytest.fixture(scope="module")
def real_store(real_stores):
    """(gallery, queries) rows of real images."""
    return np.array(real_stores.gallery.vectors), np.array(real_stores.queries.vectors)  # writable, as Voyager wants


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker more than the machine has cores. Much of the suite waits rather than computes (servers
    starting, subprocesses importing, Slurm polling), so on two cores a third worker fills the idle time."""
    return (os.cpu_count() or 1) + 1
