import zipfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import SUBSET_CLASSES, SUBSET_TRAIN_PER_CLASS, SUBSET_VAL_PER_CLASS, require_real_archive
from imgret.sources.decode import open_image
from imgret.sources.registry import load_splits
from imgret.sources.tiny_imagenet import STAMP_NAME, prepare_tiny_imagenet, verify_checksum
from imgret.errors import ConfigError, DataUnavailable


def tiny_cfg(tmp_path, archive, checksums, **extra):
    return OmegaConf.create({
        "name": "tiny_imagenet", "root": str(tmp_path / "data"), "url": "http://127.0.0.1:9/tiny.zip",
        "archive": str(archive) if archive else None, "checksums": checksums,
        "gallery_limit": None, "query_limit": None, **extra,
    })


def test_tiny_imagenet_subset_loads_with_labels_from_folders_and_annotations(tmp_path, tiny_subset_zip):
    archive, checksum = tiny_subset_zip
    splits = load_splits(tiny_cfg(tmp_path, archive, [checksum]))
    gallery, queries = splits.gallery, splits.queries
    assert len(gallery) == SUBSET_CLASSES * SUBSET_TRAIN_PER_CLASS
    assert len(queries) == SUBSET_CLASSES * SUBSET_VAL_PER_CLASS
    # train labels come from the class folder, val labels from val_annotations.txt
    for path, label in zip(gallery.paths, gallery.labels):
        assert Path(path).parent.parent.name == gallery.class_names[label]
    annotations = dict(
        line.split("\t")[:2]
        for line in (tmp_path / "data/tiny-imagenet-200/val/val_annotations.txt").read_text().splitlines()
    )
    for path, label in zip(queries.paths, queries.labels):
        assert annotations[Path(path).name] == queries.class_names[label]
    assert (tmp_path / "data/tiny-imagenet-200" / STAMP_NAME).is_file()


def test_greyscale_images_become_rgb(tmp_path, tiny_subset_zip):
    archive, checksum = tiny_subset_zip
    gallery = load_splits(tiny_cfg(tmp_path, archive, [checksum])).gallery
    modes = {Image.open(p).mode for p in gallery.paths}
    assert "L" in modes, "the subset should hold a real greyscale image"
    assert {open_image(p).mode for p in gallery.paths} == {"RGB"}


def test_stratified_limit_takes_first_n_per_class_deterministically(tmp_path, tiny_subset_zip):
    archive, checksum = tiny_subset_zip
    splits = load_splits(tiny_cfg(tmp_path, archive, [checksum], gallery_limit=3, query_limit=1))
    assert np.bincount(splits.gallery.labels).tolist() == [3] * SUBSET_CLASSES
    assert np.bincount(splits.queries.labels).tolist() == [1] * SUBSET_CLASSES
    first_class = [Path(p).name for p in splits.gallery.paths[:3]]
    assert first_class == [f"{splits.gallery.class_names[0]}_{n}.JPEG" for n in range(3)]
    again = load_splits(tiny_cfg(tmp_path, archive, [checksum], gallery_limit=3, query_limit=1))
    assert again.gallery.fingerprint == splits.gallery.fingerprint
    assert again.gallery.fingerprint != load_splits(tiny_cfg(tmp_path, archive, [checksum])).gallery.fingerprint


def test_checksum_mismatch_names_the_digest_and_the_setting(tmp_path, tiny_subset_zip):
    archive, _ = tiny_subset_zip
    with pytest.raises(DataUnavailable, match=r"sha256:[0-9a-f]{64}.*data\.checksums"):
        prepare_tiny_imagenet(tiny_cfg(tmp_path, archive, ["md5:00000000000000000000000000000000"]))
    assert not (tmp_path / "data" / "tiny-imagenet-200").exists()


def test_malformed_checksum_entry_is_a_config_error(tmp_path, tiny_subset_zip):
    archive, _ = tiny_subset_zip
    with pytest.raises(ConfigError, match="nonsense"):
        prepare_tiny_imagenet(tiny_cfg(tmp_path, archive, ["nonsense"]))


def test_missing_archive_names_data_archive(tmp_path):
    with pytest.raises(DataUnavailable, match="data.archive='/no/such.zip'"):
        prepare_tiny_imagenet(tiny_cfg(tmp_path, "/no/such.zip", []))


def test_failed_download_tells_to_use_data_archive(tmp_path):
    # port 9 on loopback refuses at once: the same path as an offline machine, without the wait
    with pytest.raises(DataUnavailable, match=r"could not download.*data\.archive="):
        prepare_tiny_imagenet(tiny_cfg(tmp_path, None, []))
    assert not list((tmp_path / "data" / "downloads").glob("*")), "no partial download may be left"


def test_interrupted_extraction_never_counts_as_done(tmp_path, tiny_subset_zip):
    archive, checksum = tiny_subset_zip
    # A copy whose last member is cut short: extraction fails midway on its CRC.
    broken = tmp_path / "broken.zip"
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        last = z.infolist()[-1]
    offset = last.header_offset + 30 + len(last.filename.encode()) + len(last.extra) + 10
    data[offset] ^= 0xFF
    broken.write_bytes(bytes(data))
    import hashlib

    broken_checksum = "sha256:" + hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(zipfile.BadZipFile):
        prepare_tiny_imagenet(tiny_cfg(tmp_path, broken, [broken_checksum]))
    root = tmp_path / "data"
    assert not (root / "tiny-imagenet-200").exists()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name], "staging folder left behind"

    # A folder without the completion stamp (say, from a killed process) is replaced, not trusted.
    (root / "tiny-imagenet-200" / "train").mkdir(parents=True)
    target = prepare_tiny_imagenet(tiny_cfg(tmp_path, archive, [checksum]))
    assert (target / STAMP_NAME).is_file() and (target / "wnids.txt").is_file()


def test_the_real_archive_passes_the_default_checksums(make_cfg):
    archive = require_real_archive()
    checksums = list(make_cfg().data.checksums)
    assert verify_checksum(archive, checksums) == checksums[1]


def write_folder_tree(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name / "nested").mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / ("nested" if i % 2 else "") / f"img_{i}.png")
    (root / "notes.txt").write_text("not an image folder")


def folder_cfg(**kwargs):
    base = {"name": "folder", "gallery_dir": None, "query_dir": None, "query_fraction": 0.25,
            "extensions": [".png", ".jpg"], "gallery_limit": None, "query_limit": None}
    return OmegaConf.create({**base, **kwargs})


def test_folder_holds_out_a_stratified_query_fraction(tmp_path):
    write_folder_tree(tmp_path / "images", {"cats": 8, "dogs": 4})
    splits = load_splits(folder_cfg(gallery_dir=str(tmp_path / "images")), seed=1)
    assert splits.gallery.class_names == ("cats", "dogs")
    assert np.bincount(splits.queries.labels).tolist() == [2, 1]
    assert np.bincount(splits.gallery.labels).tolist() == [6, 3]
    assert not set(splits.gallery.paths) & set(splits.queries.paths)


def test_folder_with_a_second_query_tree(tmp_path):
    write_folder_tree(tmp_path / "gallery", {"a": 3, "b": 3})
    write_folder_tree(tmp_path / "queries", {"b": 2})
    splits = load_splits(folder_cfg(gallery_dir=str(tmp_path / "gallery"), query_dir=str(tmp_path / "queries")))
    assert len(splits.gallery) == 6 and len(splits.queries) == 2
    assert {splits.queries.class_names[i] for i in splits.queries.labels} == {"b"}


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="data.gallery_dir"):
        load_splits(folder_cfg())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailable, match="empty"):
        load_splits(folder_cfg(gallery_dir=str(tmp_path / "empty")))


def test_synthetic_images_are_deterministic_and_class_structured(make_cfg):
    splits = load_splits(make_cfg("data=synthetic").data, seed=0)
    assert len(splits.gallery) == 200 and len(splits.queries) == 40
    a = np.asarray(open_image(splits.gallery.paths[0]), dtype=np.float32)
    assert np.array_equal(a, np.asarray(open_image(splits.gallery.paths[0]), dtype=np.float32))
    same_class = np.asarray(open_image(splits.gallery.paths[1]), dtype=np.float32)
    other_class = np.asarray(open_image(splits.gallery.paths[-1]), dtype=np.float32)
    assert np.abs(a - same_class).mean() < np.abs(a - other_class).mean()


def test_bad_limit_is_rejected(make_cfg):
    with pytest.raises(ConfigError, match="^data.gallery_limit=0: a whole number of images per class >= 1"):
        load_splits(make_cfg("data=synthetic", "data.gallery_limit=0").data)
