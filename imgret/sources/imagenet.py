"""data=imagenet: ILSVRC2012 as extracted from the official tars or Kaggle's copy; train = gallery, val =
queries, the val classes from val/<wnid>/ folders, LOC_val_solution.csv or the devkit."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgret.errors import DataUnavailable, bad_value

from imgret.sources.base import ImageSettings, ImageSource, ImageSet, Splits, natural_key
from imgret.sources.folder import list_class_folder, listing_id
from imgret.sources.tiny_imagenet import synset_titles

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ImagenetSettings(ImageSettings):
    root: str | None = None  # required: the folder ILSVRC2012 was extracted into
    val_labels: str = "auto"


def imagenet_splits(data: ImagenetSettings, seed: int = 0) -> Splits:
    root = Path(str(data.root)).expanduser()
    train_dir, val_dir = imagenet_dirs(root)
    gallery_listing = list_class_folder(train_dir, IMAGENET_EXTENSIONS)
    if any(entry.is_dir() for entry in os.scandir(val_dir)):  # val already sorted into class folders
        query_listing = list_class_folder(val_dir, IMAGENET_EXTENSIONS)
    else:
        wnid_of = imagenet_val_labels(_val_labels_file(root, str(data.val_labels)))
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
    source_id = listing_id(gallery_listing, query_listing)

    def make(split, listing):
        paths = [path for wnid in class_names for path in listing.get(wnid, [])]
        labels = [class_index[wnid] for wnid in class_names for _ in listing.get(wnid, [])]
        return ImageSet("imagenet", split, tuple(paths), np.asarray(labels, dtype=np.int64), class_names, source_id)

    mapping = next((p for p in (root / "LOC_synset_mapping.txt", root.parent / "LOC_synset_mapping.txt") if p.is_file()),
                   root / "LOC_synset_mapping.txt")
    return Splits(make("gallery", gallery_listing), make("queries", query_listing), synset_titles(mapping, class_names))


def check_imagenet(data: ImagenetSettings) -> None:
    root = data.root
    if root in (None, "???") or not Path(str(root)).expanduser().is_dir():
        raise bad_value("data.root", root, "the folder ILSVRC2012 was extracted into, holding train/<wnid>/ and val/ "
                        "(or Kaggle's ILSVRC/Data/CLS-LOC/); it is not downloaded for you")
    setting = data.val_labels
    if setting != "auto" and not Path(str(setting)).expanduser().exists():
        raise bad_value("data.val_labels", setting, f"auto, the path of {VAL_SOLUTION}, or the devkit folder {DEVKIT}")


SOURCES = (ImageSource("imagenet", ImagenetSettings, check_imagenet, imagenet_splits),)
