"""data=tiny_imagenet: the official archive (downloaded, or a local copy), verified against its checksums and
extracted once, atomically; gallery = the 100,000 train images, queries = the 10,000 val images."""
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from imgret.errors import ConfigError, DataUnavailable, allowed, bad_value

from imgret.sources.base import ImageSettings, ImageSource, ImageSet, Splits, natural_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyImagenetSettings(ImageSettings):
    root: str = ""  # extracted once under here
    url: str | None = None  # where the archive is downloaded from
    archive: str | None = None  # a local zip instead of the download
    checksums: tuple[str, ...] = ()  # "md5:<hex>" or "sha256:<hex>": an archive is accepted when one matches


TINY_DIRNAME = "tiny-imagenet-200"
STAMP_NAME = ".imgret-extracted.json"


def tiny_imagenet_splits(data: TinyImagenetSettings, seed: int = 0) -> Splits:
    root = prepare_tiny_imagenet(data)
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


def prepare_tiny_imagenet(data: TinyImagenetSettings) -> Path:
    """The extracted dataset folder, downloading, verifying and extracting the archive if needed."""
    root = Path(data.root).expanduser().resolve()
    target = root / TINY_DIRNAME
    archive = data.archive
    checksums = list(data.checksums or [])

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
        archive_path = download(data.url, root / "downloads" / Path(data.url).name)

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


def check_tiny_imagenet(data: TinyImagenetSettings) -> None:
    archive = data.archive
    if archive is not None:
        path = Path(str(archive)).expanduser()
        if not path.is_file():
            raise bad_value("data.archive", archive, f"the path of a tiny-imagenet-200.zip; {path.resolve()} does not exist")
        if not zipfile.is_zipfile(path):
            raise bad_value("data.archive", archive, "a zip archive (tiny-imagenet-200.zip); this file is not a zip")
    elif not str(data.url or "").startswith(("http://", "https://", "file://")):
        raise bad_value("data.url", data.url, "an http(s):// or file:// address of the zip, or set data.archive")
    for checksum in data.checksums or []:
        algorithm, _, value = str(checksum).partition(":")
        if algorithm not in hashlib.algorithms_available or not re.fullmatch(r"[0-9a-fA-F]+", value):
            raise bad_value("data.checksums", checksum, "entries reading '<algorithm>:<hex>', e.g. 'sha256:...'")


SOURCES = (ImageSource("tiny_imagenet", TinyImagenetSettings, check_tiny_imagenet, tiny_imagenet_splits),)
