"""Every data source by name (conf/data/<name>.yaml): image sources list their splits, vector sources plan their
stores. A new source is one module with its `SOURCE` and one yaml, named here."""
from __future__ import annotations

import logging

from imgret.errors import DataUnavailable, allowed, bad_value

from imgret.sources import folder, imagenet, synthetic, tiny_imagenet, vectors
from imgret.sources.base import DataSource, Splits, check_common, stratified_subset

log = logging.getLogger(__name__)


SOURCES: dict[str, DataSource] = {
    "tiny_imagenet": tiny_imagenet.SOURCE,
    "folder": folder.SOURCE,
    "imagenet": imagenet.SOURCE,
    "synthetic": synthetic.SOURCE,
    "synthetic_vectors": vectors.SYNTHETIC_VECTORS,
    "vectors": vectors.VECTORS,
}


def is_vector_source(data_cfg) -> bool:
    return data_cfg.get("name") in SOURCES and SOURCES[data_cfg.name].plan is not None


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


def check_data(data_cfg) -> None:
    """Every data key, before any download, listing or extraction."""
    name = data_cfg.get("name")
    if name not in SOURCES:
        raise bad_value("data.name", name, f"one of {allowed(SOURCES)}")
    check_common(data_cfg)
    SOURCES[name].check(data_cfg)
