"""data=imagenet on small generated trees in ILSVRC2012's layouts: the official extraction with the devkit's
ground truth, Kaggle's with LOC_val_solution.csv, and val already sorted into class folders."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from imgret.sources.registry import load_splits
from imgret.errors import ConfigError, DataUnavailable
from imgret.run import run_tracked
from test_faults import all_runs

WNIDS = ("n01440764", "n01443537", "n02119789")
DEVKIT_ID = {"n02119789": 1, "n01440764": 2, "n01443537": 3}  # the devkit's ids are not in wnid order
TRAIN_PER_CLASS = 4
# val image number -> class, interleaved as in the real val set
VAL_CLASSES = {1: "n02119789", 2: "n01440764", 3: "n01443537", 4: "n01440764", 5: "n02119789", 6: "n01443537"}


def jpeg(path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, "JPEG")


def make_tree(base, val_in_folders: bool = False):
    for c, wnid in enumerate(WNIDS):
        for i in range(TRAIN_PER_CLASS):
            jpeg(base / "train" / wnid / f"{wnid}_{i + 10}.JPEG", (80 * c, 40 * i, 100))
    (base / "val").mkdir(parents=True)
    for number, wnid in VAL_CLASSES.items():
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        jpeg(base / "val" / wnid / name if val_in_folders else base / "val" / name, (80 * WNIDS.index(wnid), 60, 100))


def write_devkit(root) -> None:
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = [(DEVKIT_ID[w], w, f"class {w}", 0) for w in WNIDS] + [(1001, "n00001740", "entity", 3)]
    savemat(data / "meta.mat", {"synsets": np.array(synsets, dtype=fields).reshape(-1, 1)})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{DEVKIT_ID[VAL_CLASSES[n]]}\n" for n in sorted(VAL_CLASSES)))


def write_solution(path) -> None:
    rows = [f"ILSVRC2012_val_{n:08d},{wnid} 1 2 30 20" for n, wnid in VAL_CLASSES.items()]
    path.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")


def assert_official_splits(splits) -> None:
    gallery, queries = splits.gallery, splits.queries
    assert gallery.class_names == WNIDS and len(gallery) == 3 * TRAIN_PER_CLASS
    assert [gallery.class_names[label] for label in gallery.labels] == [w for w in WNIDS for _ in range(TRAIN_PER_CLASS)]
    assert len(queries) == len(VAL_CLASSES)
    for path, label in zip(queries.paths, queries.labels):
        number = int(path.rsplit("_", 1)[1].split(".")[0])
        assert queries.class_names[label] == VAL_CLASSES[number], path


def test_the_official_layout_with_the_devkits_ground_truth(make_cfg, tmp_path):
    make_tree(tmp_path / "ILSVRC2012")
    write_devkit(tmp_path / "ILSVRC2012")
    assert_official_splits(load_splits(make_cfg("data=imagenet", f"data.root={tmp_path / 'ILSVRC2012'}").data))


def test_kaggles_layout_with_loc_val_solution(make_cfg, tmp_path):
    make_tree(tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC")
    write_solution(tmp_path / "kaggle" / "LOC_val_solution.csv")
    (tmp_path / "kaggle" / "LOC_synset_mapping.txt").write_text(  # Kaggle's class names, one per line
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn02119789 kit fox, Vulpes macrotis\n")
    splits = load_splits(make_cfg("data=imagenet", f"data.root={tmp_path / 'kaggle'}").data)
    assert_official_splits(splits)
    assert splits.titles == {"n01440764": "tench", "n01443537": "goldfish", "n02119789": "kit fox"}


def test_val_sorted_into_class_folders_needs_no_labels_file(make_cfg, tmp_path):
    make_tree(tmp_path / "sorted", val_in_folders=True)
    cfg = make_cfg("data=imagenet", f"data.root={tmp_path / 'sorted'}", "data.gallery_limit=2",
                   "model.pretrained=false", "model.image_size=32", "method=flat", "k=3")
    assert_official_splits(load_splits(make_cfg("data=imagenet", f"data.root={tmp_path / 'sorted'}").data))
    metrics = run_tracked(cfg)  # end to end: images -> store -> index -> MLflow
    assert metrics["gallery_size"] == 3 * 2 and metrics["query_size"] == len(VAL_CLASSES)
    assert all_runs(cfg.tracking.uri)[0].info.status == "FINISHED"


def test_missing_pieces_are_named(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.root=.*not downloaded for you"):
        load_splits(make_cfg("data=imagenet", f"data.root={tmp_path / 'nowhere'}").data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailable, match="no train/ and val/"):
        load_splits(make_cfg("data=imagenet", f"data.root={tmp_path / 'empty'}").data)
    make_tree(tmp_path / "flat")
    with pytest.raises(DataUnavailable, match="set data.val_labels"):
        load_splits(make_cfg("data=imagenet", f"data.root={tmp_path / 'flat'}").data)
    with pytest.raises(ConfigError, match=r"^data.val_labels="):
        load_splits(make_cfg("data=imagenet", f"data.root={tmp_path / 'flat'}",
                             f"data.val_labels={tmp_path / 'missing.csv'}").data)
