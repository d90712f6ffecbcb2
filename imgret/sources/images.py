"""Images stage: which images form the gallery and the queries, with their labels.

The contract with the next stage is `ImageSet`: parallel lists of paths and integer labels, plus a
fingerprint that changes whenever the set of images changes (it keys the embedding cache). Paths
are plain files, or `synthetic://...` addresses that fully describe a generated image, so a worker
process can open any image from its path alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from imgret.errors import BadImage, ConfigError, DataUnavailable, allowed, bad_value

log = logging.getLogger(__name__)

SPLITS = ("gallery", "queries")
BAD_IMAGE_POLICIES = ("skip", "fail")
# Pillow's own decompression-bomb threshold: larger images are refused unless data.max_image_pixels says otherwise.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# `open_image` checks data.max_image_pixels itself, from the header, before decoding: Pillow's own check would
# refuse images a user allowed, and name a limit the user never set.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageSet:
    """One split: image i is `paths[i]`, of class `class_names[labels[i]]`."""

    dataset: str
    split: str
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    source_id: str  # what the paths point into: an archive digest, a folder's listing hash, ...

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.dataset}|{self.split}|{self.source_id}|".encode())
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(f"{path}\t{label}\n".encode())
        return digest.hexdigest()[:16]

    def open(self, i: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
        return open_image(self.paths[i], max_pixels)


@dataclass(frozen=True)
class Splits:
    gallery: ImageSet
    queries: ImageSet
    titles: dict[str, str] = field(default_factory=dict)  # class name -> what a person calls it ("n01443537": "goldfish")


def open_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image, fully decoded, or `BadImage` saying why this file cannot be one.

    Greyscale and palette images are converted (Tiny-ImageNet has greyscale ones); 16-bit and float
    images are scaled to 8 bits rather than clipped (Pillow's own convert would turn them white)."""
    if path.startswith(SYNTHETIC_SCHEME):
        return synthetic_image(path)
    return decode_image(path, path, max_pixels)


# JPEG frame headers torchvision.io.decode_jpeg reads as Pillow does: baseline, extended and progressive Huffman
_PLAIN_JPEG_FRAMES = (0xC0, 0xC1, 0xC2)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, read before any pixel is decoded; None when `data` is not a
    JPEG of 8-bit samples in a plain frame (lossless, arithmetic-coded and 12-bit ones are left to Pillow)."""
    if data[:2] != b"\xff\xd8":
        return None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if marker in _PLAIN_JPEG_FRAMES:
            if position + 10 > end:
                return None
            precision, components = data[position + 4], data[position + 9]
            height = int.from_bytes(data[position + 5:position + 7], "big")
            width = int.from_bytes(data[position + 7:position + 9], "big")
            return (width, height) if precision == 8 and components in (1, 3, 4) and width and height else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # another kind of frame, or a scan before any frame
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def read_small_file(path: str) -> bytearray | None:
    """A file's bytes in one read call (a third of what Python's buffered open costs on a 2 KB JPEG), or None
    when it cannot be read so (missing, unreadable, changing): the caller then lets Pillow open it and say why."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(descriptor).st_size
        data = os.read(descriptor, size + 1)
    except OSError:
        return None
    finally:
        os.close(descriptor)
    return bytearray(data) if len(data) == size else None


def decode_jpeg_rgb(data: bytearray):
    """JPEG bytes to a (3, H, W) uint8 RGB tensor by the op torchvision.io.decode_jpeg calls, without that
    function's per-call usage log and deprecation warning, which cost a third of the decode of a 64 px image."""
    import torch
    import torchvision.io  # registers torch.ops.image

    return torch.ops.image.decode_jpeg(torch.frombuffer(data, dtype=torch.uint8),
                                       torchvision.io.ImageReadMode.RGB.value, False)


def open_pixels(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """`open_image` as a (3, H, W) uint8 tensor. JPEGs are decoded by torchvision's libjpeg-turbo op: the same
    pixels as Pillow's in half the time (no PIL image, no copy into a tensor). Any other format, and a JPEG it
    refuses (truncated, corrupt), goes through Pillow, which says why it is unusable."""
    from torchvision.transforms.functional import pil_to_tensor

    if path.startswith(SYNTHETIC_SCHEME):
        return pil_to_tensor(synthetic_image(path))
    data = read_small_file(path)
    size = jpeg_size(data) if data is not None else None
    if size is not None and size[0] * size[1] <= max_pixels:
        try:
            return decode_jpeg_rgb(data)
        except RuntimeError:
            pass  # Pillow decides, and says why when it cannot decode it either
    return pil_to_tensor(open_image(path, max_pixels))  # from the path: Pillow's messages name the file


def decode_image(source: str | BinaryIO, name: str, max_pixels: int,
                 limit_key: str = "data.max_image_pixels") -> Image.Image:
    """`open_image` for a path or an open file (an upload): the pixel count is checked from the header,
    before decoding, so a decompression bomb is refused without allocating its pixels."""
    try:
        with Image.open(source) as image:
            if image.width * image.height > max_pixels:
                raise BadImage(name, f"{image.width}x{image.height} pixels is over {limit_key}={max_pixels}",
                               "too_many_pixels")
            image.load()  # decode now: a truncated file fails here, not later inside a batch
            return to_rgb(image)
    except BadImage:
        raise
    except UnidentifiedImageError as error:  # not an image, or zero bytes
        raise BadImage(name, f"{type(error).__name__}: {error}", "not_an_image") from error
    except (OSError, ValueError, SyntaxError) as error:
        # Pillow: OSError (truncated), SyntaxError (broken header)
        raise BadImage(name, f"{type(error).__name__}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        # 16-bit sources use the full 0..65535 range; float images are taken as 0..1 when they fit there
        top = 65535.0 if image.mode != "F" or pixels.max(initial=0) > 1.0 else 1.0
        pixels = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels over white, as a viewer shows them, rather than over whatever colour they hold
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class DataSource:
    """One kind of data: `check` validates its keys before any work; `load` lists an image source's splits.
    A vector source (no `load`) writes embedding stores itself (imgret.sources.vectors): no images, no model."""

    check: Callable[..., None]  # (data_cfg) -> None, raises ConfigError
    load: Callable[..., Splits] | None = None  # (data_cfg, seed) -> Splits


def is_vector_source(data_cfg) -> bool:
    return data_cfg.get("name") in SOURCES and SOURCES[data_cfg.name].load is None


def load_splits(data_cfg, seed: int = 0) -> Splits:
    check_data(data_cfg)
    name = data_cfg.name
    splits = SOURCES[name].load(data_cfg, seed)
    gallery = stratified_subset(splits.gallery, data_cfg.get("gallery_limit"))
    queries = stratified_subset(splits.queries, data_cfg.get("query_limit"))
    for image_set in (gallery, queries):
        if len(image_set) == 0:
            raise DataUnavailable(f"the {name} {image_set.split} split has no images")
    return Splits(gallery, queries, splits.titles)


def stratified_subset(image_set: ImageSet, per_class: int | None) -> ImageSet:
    """The first `per_class` images of every class, in the set's (deterministic) order."""
    if per_class is None:
        return image_set
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(image_set.labels.tolist()):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return ImageSet(
        dataset=image_set.dataset,
        split=image_set.split,
        paths=tuple(image_set.paths[i] for i in keep),
        labels=image_set.labels[keep],
        class_names=image_set.class_names,
        source_id=image_set.source_id,
    )


def natural_key(text: str) -> list:
    """`img_2` before `img_10`, so that 'the first N images' means what a person expects."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------- Tiny-ImageNet

TINY_DIRNAME = "tiny-imagenet-200"
STAMP_NAME = ".imgret-extracted.json"


def tiny_imagenet_splits(data_cfg, seed: int = 0) -> Splits:
    root = prepare_tiny_imagenet(data_cfg)
    source_id = json.loads((root / STAMP_NAME).read_text())["digest"]
    class_names = tuple((root / "wnids.txt").read_text().split())
    class_index = {wnid: i for i, wnid in enumerate(class_names)}

    gallery_paths, gallery_labels = [], []
    for wnid in class_names:
        image_dir = root / "train" / wnid / "images"
        names = sorted((entry.name for entry in os.scandir(image_dir) if entry.is_file()), key=natural_key)
        gallery_paths += [str(image_dir / name) for name in names]
        gallery_labels += [class_index[wnid]] * len(names)

    query_rows = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        if line.strip():
            filename, wnid = line.split("\t")[:2]
            query_rows.append((filename, class_index[wnid]))
    query_rows.sort(key=lambda row: natural_key(row[0]))
    query_paths = [str(root / "val" / "images" / filename) for filename, _ in query_rows]
    query_labels = [label for _, label in query_rows]

    def make(split, paths, labels):
        return ImageSet("tiny_imagenet", split, tuple(paths), np.asarray(labels, dtype=np.int64),
                        class_names, source_id)

    return Splits(make("gallery", gallery_paths, gallery_labels), make("queries", query_paths, query_labels),
                  synset_titles(root / "words.txt", class_names))


def synset_titles(mapping: Path, wnids: Sequence[str]) -> dict[str, str]:
    """wnid -> its first WordNet lemma ("n01443537\tgoldfish, Carassius auratus" -> "goldfish"), from
    Tiny-ImageNet's words.txt or Kaggle's LOC_synset_mapping.txt (tab or space separated); {} without the file."""
    if not mapping.is_file():
        return {}
    wanted, titles = set(wnids), {}
    for line in mapping.read_text(errors="replace").splitlines():
        wnid, _, words = line.strip().replace("\t", " ", 1).partition(" ")
        if wnid in wanted:
            titles[wnid] = words.split(",")[0].strip() or wnid
    return titles


def prepare_tiny_imagenet(data_cfg) -> Path:
    """The extracted dataset folder, downloading, verifying and extracting the archive if needed."""
    root = Path(data_cfg.root).expanduser().resolve()
    target = root / TINY_DIRNAME
    archive = data_cfg.get("archive")
    checksums = list(data_cfg.get("checksums") or [])

    if archive is not None:
        archive_path = Path(archive).expanduser().resolve()
        if not archive_path.is_file():
            raise DataUnavailable(
                f"data.archive={archive!r} does not exist (resolved to {archive_path}); "
                "give the path of a tiny-imagenet-200.zip"
            )
        if _stamp_matches(target, archive_path):
            return target
    else:
        if _stamp_matches(target, None):
            return target
        archive_path = download(data_cfg.url, root / "downloads" / Path(data_cfg.url).name)

    digest = verify_checksum(archive_path, checksums)
    extract_atomically(archive_path, target, digest)
    return target


def _stamp_matches(target: Path, archive_path: Path | None) -> bool:
    """True if `target` is a finished extraction (of this very archive file, when one is given)."""
    stamp_path = target / STAMP_NAME
    if not stamp_path.is_file():
        return False
    if archive_path is None:
        return True
    stamp = json.loads(stamp_path.read_text())
    stat = archive_path.stat()
    if stamp.get("archive_size") == stat.st_size and stamp.get("archive_mtime_ns") == stat.st_mtime_ns:
        return True
    # Another copy of the same archive (same digest) is as good; a different archive is re-extracted.
    return stamp.get("digest") in _digests(archive_path, ("sha256",)).values()


def download(url: str, destination: Path) -> Path:
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f"{destination.name}.part-{uuid.uuid4().hex[:8]}")
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {destination.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise DataUnavailable(
            f"could not download {url}: {error}. Offline, or behind a proxy? Download the zip elsewhere "
            "and pass it with data.archive=/path/to/tiny-imagenet-200.zip"
        ) from error
    os.replace(partial, destination)
    return destination


def _digests(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                           desc=f"checksum {path.name}", leave=False) as bar:
        while chunk := handle.read(1 << 22):
            for hasher in hashers.values():
                hasher.update(chunk)
            bar.update(len(chunk))
    return {name: f"{name}:{hasher.hexdigest()}" for name, hasher in hashers.items()}


def verify_checksum(archive_path: Path, checksums: Sequence[str]) -> str:
    """The archive's sha256 digest, once one of its digests is found in `checksums`."""
    algorithms = {"sha256"}
    for checksum in checksums:
        algorithm, _, value = str(checksum).partition(":")
        if algorithm not in hashlib.algorithms_available or not value:
            raise ConfigError(f"data.checksums entry {checksum!r} must read '<algorithm>:<hex>', e.g. 'sha256:...'")
        algorithms.add(algorithm)
    digests = _digests(archive_path, sorted(algorithms))
    if not any(str(checksum).lower() in digests.values() for checksum in checksums):
        raise DataUnavailable(
            f"{archive_path} has checksum {digests['sha256']}, which is not among data.checksums "
            f"({allowed(checksums) or 'none'}). If this archive is the one you mean, accept it with "
            f"data.checksums=[{digests['sha256']}]"
        )
    return digests["sha256"]


def extract_atomically(archive_path: Path, target: Path, digest: str) -> None:
    """Extract into a temporary folder, stamp it, then rename: a half-done extraction never counts."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(archive_path) as archive:
            prefix = f"{TINY_DIRNAME}/"
            members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            if not members:
                raise DataUnavailable(f"{archive_path} holds no {prefix} folder: is it Tiny-ImageNet-200?")
            for member in tqdm(members, desc=f"extract {archive_path.name}", unit="file", miniters=1000):
                archive.extract(member, staging)
        stat = archive_path.stat()
        stamp = {"digest": digest, "archive": str(archive_path), "archive_size": stat.st_size,
                 "archive_mtime_ns": stat.st_mtime_ns}
        (staging / TINY_DIRNAME / STAMP_NAME).write_text(json.dumps(stamp, indent=1))
        if target.exists():  # an older or unfinished extraction: move it aside, then replace it
            stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging / TINY_DIRNAME, target)
        except OSError:
            if not (target / STAMP_NAME).is_file():  # not a concurrent extraction that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- image folders


def list_class_folder(folder: Path, extensions: Sequence[str]) -> dict[str, list[str]]:
    suffixes = {ext.lower() for ext in extensions}
    if not folder.is_dir():
        raise DataUnavailable(f"image folder {folder} does not exist")
    classes = {}
    for class_dir in sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)):
        files = [str(p) for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in suffixes]
        if files:
            classes[class_dir.name] = sorted(files, key=natural_key)
    if not classes:
        raise DataUnavailable(
            f"{folder} holds no images in class subfolders (<class>/<image>, extensions {', '.join(suffixes)})"
        )
    return classes


def _listing_id(*listings: dict[str, list[str]]) -> str:
    digest = hashlib.sha256()
    for listing in listings:
        for files in listing.values():
            for path in files:
                stat = os.stat(path)
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"listing:{digest.hexdigest()[:16]}"


def folder_splits(data_cfg, seed: int) -> Splits:
    gallery_listing = list_class_folder(Path(data_cfg.gallery_dir), data_cfg.extensions)
    if data_cfg.get("query_dir"):
        query_listing = list_class_folder(Path(data_cfg.query_dir), data_cfg.extensions)
    else:
        fraction = float(data_cfg.query_fraction)
        rng = np.random.default_rng(seed)
        query_listing = {}
        for name, files in gallery_listing.items():
            n_query = min(len(files) - 1, max(1, round(fraction * len(files))))
            chosen = set(rng.permutation(len(files))[:n_query].tolist())
            query_listing[name] = [f for i, f in enumerate(files) if i in chosen]
            gallery_listing[name] = [f for i, f in enumerate(files) if i not in chosen]
    class_names = tuple(sorted(set(gallery_listing) | set(query_listing), key=natural_key))
    class_index = {name: i for i, name in enumerate(class_names)}
    source_id = _listing_id(gallery_listing, query_listing)

    def make(split, listing):
        paths = [path for name in listing for path in listing[name]]
        labels = [class_index[name] for name in listing for _ in listing[name]]
        return ImageSet("folder", split, tuple(paths), np.asarray(labels, dtype=np.int64), class_names, source_id)

    return Splits(make("gallery", gallery_listing), make("queries", query_listing))


# --------------------------------------------------------------------------- ImageNet (ILSVRC2012)

IMAGENET_EXTENSIONS = (".jpeg", ".jpg", ".png")
VAL_SOLUTION = "LOC_val_solution.csv"  # Kaggle's ImageNet localisation challenge
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


def imagenet_dirs(root: Path) -> tuple[Path, Path]:
    """train/ and val/ of the official extraction (root/train, root/val) or of Kaggle's (root/ILSVRC/Data/CLS-LOC)."""
    for base in (root, root / "ILSVRC" / "Data" / "CLS-LOC"):
        if (base / "train").is_dir() and (base / "val").is_dir():
            return base / "train", base / "val"
    raise DataUnavailable(f"{root} has no train/ and val/ folders (nor ILSVRC/Data/CLS-LOC/train and val/): "
                          "extract ILSVRC2012_img_train.tar (and each class's tar inside it) into train/<wnid>/ "
                          "and ILSVRC2012_img_val.tar into val/")


def _val_labels_file(root: Path, setting: str) -> Path:
    """Where the val images' classes are: the given file or devkit folder, or (auto) one found under the root."""
    if setting != "auto":
        return Path(setting).expanduser()
    for candidate in (root / VAL_SOLUTION, root.parent / VAL_SOLUTION, root / DEVKIT, root.parent / DEVKIT):
        if candidate.exists():
            return candidate
    raise DataUnavailable(f"the ImageNet val images in {root} are not in class folders, and neither {VAL_SOLUTION} "
                          f"nor the devkit folder {DEVKIT} is in {root} or its parent: set data.val_labels to one")


def imagenet_val_labels(labels_path: Path) -> dict[str, str]:
    """Val image name (without ending) -> wnid, from Kaggle's LOC_val_solution.csv or the ILSVRC2012 devkit
    (its validation ground truth holds devkit class ids, which meta.mat maps to wnids; needs scipy)."""
    if labels_path.is_file():
        rows = labels_path.read_text().splitlines()[1:]  # ImageId,PredictionString
        return {image_id: prediction.split()[0] for image_id, prediction in
                (row.split(",", 1) for row in rows if row.strip())}
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise DataUnavailable(f"reading the devkit's meta.mat needs scipy (pip install scipy), or give "
                              f"data.val_labels={VAL_SOLUTION}") from error
    synsets = loadmat(str(labels_path / "data" / "meta.mat"), squeeze_me=True)["synsets"]
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    ids = (labels_path / DEVKIT_TRUTH).read_text().split()
    return {f"ILSVRC2012_val_{i + 1:08d}": wnid_of[int(class_id)] for i, class_id in enumerate(ids)}


def imagenet_splits(data_cfg, seed: int = 0) -> Splits:
    root = Path(str(data_cfg.root)).expanduser()
    train_dir, val_dir = imagenet_dirs(root)
    gallery_listing = list_class_folder(train_dir, IMAGENET_EXTENSIONS)
    if any(entry.is_dir() for entry in os.scandir(val_dir)):  # val already sorted into class folders
        query_listing = list_class_folder(val_dir, IMAGENET_EXTENSIONS)
    else:
        wnid_of = imagenet_val_labels(_val_labels_file(root, str(data_cfg.val_labels)))
        query_listing: dict[str, list[str]] = {}
        files = sorted((e.name for e in os.scandir(val_dir) if Path(e.name).suffix.lower() in IMAGENET_EXTENSIONS),
                       key=natural_key)
        unlabelled = [name for name in files if Path(name).stem not in wnid_of]
        if unlabelled:
            raise DataUnavailable(f"{len(unlabelled)} val images have no class in data.val_labels "
                                  f"(first: {unlabelled[0]}): is it the ILSVRC2012 one?")
        for name in files:
            query_listing.setdefault(wnid_of[Path(name).stem], []).append(str(val_dir / name))
    unknown = sorted(set(query_listing) - set(gallery_listing))
    if unknown:
        raise DataUnavailable(f"val classes {', '.join(unknown[:3])}... have no train/ folder")
    class_names = tuple(sorted(gallery_listing))
    class_index = {wnid: i for i, wnid in enumerate(class_names)}
    source_id = _listing_id(gallery_listing, query_listing)

    def make(split, listing):
        paths = [path for wnid in class_names for path in listing.get(wnid, [])]
        labels = [class_index[wnid] for wnid in class_names for _ in listing.get(wnid, [])]
        return ImageSet("imagenet", split, tuple(paths), np.asarray(labels, dtype=np.int64), class_names, source_id)

    mapping = next((p for p in (root / "LOC_synset_mapping.txt", root.parent / "LOC_synset_mapping.txt") if p.is_file()),
                   root / "LOC_synset_mapping.txt")
    return Splits(make("gallery", gallery_listing), make("queries", query_listing), synset_titles(mapping, class_names))


# --------------------------------------------------------------------------- synthetic images

SYNTHETIC_SCHEME = "synthetic://"


def synthetic_splits(data_cfg, seed: int) -> Splits:
    size = int(data_cfg.image_size)
    n_classes = int(data_cfg.num_classes)
    class_names = tuple(f"class_{c:03d}" for c in range(n_classes))

    def make(split, per_class):
        paths = [f"{SYNTHETIC_SCHEME}{seed}/{size}/{split}/{c}/{i}" for c in range(n_classes) for i in range(per_class)]
        labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
        return ImageSet("synthetic", split, tuple(paths), labels, class_names, f"synthetic:{seed}:{size}")

    return Splits(make("gallery", int(data_cfg.gallery_per_class)), make("queries", int(data_cfg.query_per_class)))


def synthetic_image(path: str) -> Image.Image:
    """A smooth per-class colour pattern, shifted, brightened and noised per image."""
    seed, size, split, label, index = path[len(SYNTHETIC_SCHEME):].split("/")
    seed, size, label, index = int(seed), int(size), int(label), int(index)
    class_rng = np.random.default_rng([seed, label])
    coarse = class_rng.random((3, 4, 4), dtype=np.float32)
    pattern = np.kron(coarse, np.ones((1, size // 4 + 1, size // 4 + 1), np.float32))[:, :size, :size]
    image_rng = np.random.default_rng([seed, label, SPLITS.index(split), index])
    shift = image_rng.integers(-size // 8, size // 8 + 1, size=2)
    pattern = np.roll(pattern, tuple(shift), axis=(1, 2))
    pattern = pattern * image_rng.uniform(0.8, 1.2) + image_rng.normal(0, 0.08, pattern.shape)
    pixels = (np.clip(pattern, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(pixels, "RGB")


# --------------------------------------------------------------------------- checks and the registry


def _is_whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_common(data_cfg) -> None:
    """Keys every image source has: the stratified limits and what to do with a bad image."""
    for key in ("gallery_limit", "query_limit"):
        value = data_cfg.get(key)
        if value is not None and not _is_whole(value, 1):
            raise bad_value(f"data.{key}", value, "a whole number of images per class >= 1, or null for all")
    policy = data_cfg.get("on_bad_image", "skip")
    if policy not in BAD_IMAGE_POLICIES:
        raise bad_value("data.on_bad_image", policy, f"one of {allowed(BAD_IMAGE_POLICIES)}")
    max_pixels = data_cfg.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    if not _is_whole(max_pixels, 1):
        raise bad_value("data.max_image_pixels", max_pixels, "a whole number of pixels >= 1")


def check_tiny_imagenet(data_cfg) -> None:
    archive = data_cfg.get("archive")
    if archive is not None:
        path = Path(str(archive)).expanduser()
        if not path.is_file():
            raise bad_value("data.archive", archive, f"the path of a tiny-imagenet-200.zip; {path.resolve()} does not exist")
        if not zipfile.is_zipfile(path):
            raise bad_value("data.archive", archive, "a zip archive (tiny-imagenet-200.zip); this file is not a zip")
    elif not str(data_cfg.get("url") or "").startswith(("http://", "https://", "file://")):
        raise bad_value("data.url", data_cfg.get("url"), "an http(s):// or file:// address of the zip, or set data.archive")
    for checksum in data_cfg.get("checksums") or []:
        algorithm, _, value = str(checksum).partition(":")
        if algorithm not in hashlib.algorithms_available or not re.fullmatch(r"[0-9a-fA-F]+", value):
            raise bad_value("data.checksums", checksum, "entries reading '<algorithm>:<hex>', e.g. 'sha256:...'")


def check_folder(data_cfg) -> None:
    if data_cfg.get("gallery_dir") in (None, "???"):
        raise bad_value("data.gallery_dir", data_cfg.get("gallery_dir"), "a folder of <class>/<image> files (required)")
    for key in ("gallery_dir", "query_dir"):
        value = data_cfg.get(key)
        if value is not None and not Path(str(value)).expanduser().is_dir():
            raise bad_value(f"data.{key}", value, "an existing folder of <class>/<image> files")
    if not data_cfg.get("query_dir"):
        fraction = data_cfg.get("query_fraction")
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
            raise bad_value("data.query_fraction", fraction, "a fraction strictly between 0 and 1")
    extensions = data_cfg.get("extensions")
    if not extensions or not all(isinstance(e, str) and e.startswith(".") for e in extensions):
        raise bad_value("data.extensions", extensions, "a list of file endings such as [.jpg, .png]")


def check_imagenet(data_cfg) -> None:
    root = data_cfg.get("root")
    if root in (None, "???") or not Path(str(root)).expanduser().is_dir():
        raise bad_value("data.root", root, "the folder ILSVRC2012 was extracted into, holding train/<wnid>/ and val/ "
                        "(or Kaggle's ILSVRC/Data/CLS-LOC/); it is not downloaded for you")
    setting = data_cfg.get("val_labels", "auto")
    if setting != "auto" and not Path(str(setting)).expanduser().exists():
        raise bad_value("data.val_labels", setting, f"auto, the path of {VAL_SOLUTION}, or the devkit folder {DEVKIT}")


def check_synthetic(data_cfg) -> None:
    for key, low in (("image_size", 8), ("num_classes", 1), ("gallery_per_class", 1), ("query_per_class", 1)):
        if not _is_whole(data_cfg.get(key), low):
            raise bad_value(f"data.{key}", data_cfg.get(key), f"a whole number >= {low}")


def check_synthetic_vectors(data_cfg) -> None:
    for key, low in (("gallery_size", 1), ("query_size", 1), ("dim", 2), ("clusters", 1)):
        if not _is_whole(data_cfg.get(key), low):
            raise bad_value(f"data.{key}", data_cfg.get(key), f"a whole number >= {low}")
    for key, meaning in (("spread", "how far points lie from their centre, along the cluster's subspace"),
                         ("noise", "noise in every dimension")):
        value = data_cfg.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise bad_value(f"data.{key}", value, f"a number >= 0: {meaning}")
    intrinsic = data_cfg.get("intrinsic_dim")
    if not _is_whole(intrinsic, 1) or intrinsic > data_cfg.get("dim"):
        raise bad_value("data.intrinsic_dim", intrinsic, f"a whole number from 1 to data.dim ({data_cfg.get('dim')})")


def check_vectors(data_cfg) -> None:
    """The files exist and are what their endings say (headers only), and the split fits in them."""
    from imgret.sources.vector_files import FILE_FORMATS, VectorFileError, open_vectors

    files = {"gallery": data_cfg.get("gallery"), "queries": data_cfg.get("queries")}
    if files["gallery"] in (None, "???"):
        raise bad_value("data.gallery", files["gallery"], f"a file of vectors ({', '.join(FILE_FORMATS)}) or a "
                        "clip-retrieval output folder (required)")
    shapes = {}
    for split, value in files.items():
        if value is None:
            continue
        path = Path(str(value)).expanduser()
        if not path.exists():
            raise bad_value(f"data.{split}", value, "an existing file of vectors or clip-retrieval folder")
        try:
            shapes[split] = open_vectors(path)
        except (VectorFileError, OSError) as error:
            raise bad_value(f"data.{split}", value, f"a readable file of vectors ({error})") from error
    gallery = shapes["gallery"]
    if "queries" in shapes and shapes["queries"].dim != gallery.dim:
        raise bad_value("data.queries", files["queries"], f"vectors of the gallery's dimension {gallery.dim} "
                        f"(it holds dimension {shapes['queries'].dim})")
    for key, split in (("gallery_labels", "gallery"), ("query_labels", "queries")):
        value = data_cfg.get(key)
        if value is None:
            continue
        expected = shapes[split].count if split in shapes else None
        try:
            labels = np.load(Path(str(value)).expanduser(), mmap_mode="r")  # the header only
            fits = labels.ndim == 1 and labels.dtype.kind in "iu" and expected in (None, len(labels))
        except (OSError, ValueError):
            fits = False
        if not fits:
            raise bad_value(f"data.{key}", value, "a .npy of whole-number labels, one per vector"
                            + (f" ({expected})" if expected is not None else "") + ", or null")
    if "queries" not in shapes and "queries" not in gallery.extras:
        if not _is_whole(data_cfg.get("query_size"), 1) or data_cfg.query_size >= gallery.count:
            raise bad_value("data.query_size", data_cfg.get("query_size"), "a whole number of vectors to hold out "
                            f"of the gallery as queries, from 1 to {gallery.count - 1}")


SOURCES: dict[str, DataSource] = {
    "tiny_imagenet": DataSource(check_tiny_imagenet, tiny_imagenet_splits),
    "folder": DataSource(check_folder, folder_splits),
    "imagenet": DataSource(check_imagenet, imagenet_splits),
    "synthetic": DataSource(check_synthetic, synthetic_splits),
    "synthetic_vectors": DataSource(check_synthetic_vectors),
    "vectors": DataSource(check_vectors),
}


def check_data(data_cfg) -> None:
    """Every data key, before any download, listing or extraction."""
    name = data_cfg.get("name")
    if name not in SOURCES:
        raise bad_value("data.name", name, f"one of {allowed(SOURCES)}")
    check_common(data_cfg)
    SOURCES[name].check(data_cfg)
