"""Every data source by name (conf/data/<name>.yaml), found where it lives: the `SOURCES` of each module of
imgret/sources (one module per source, or per family of sources, as vectors.py holds two). An image source lists
its splits for a model to embed; a vector source plans ready stores. A new source is one module and one yaml."""
from __future__ import annotations

import logging
from functools import cache

from imgret import sources
from imgret.errors import DataUnavailable, allowed, bad_value
from imgret.plugins import found_in
from imgret.sources.base import (DataSource, ImagesToEmbed, ReadyVectors, Splits, VectorSource, check_common,
                                 stratified_subset)

log = logging.getLogger(__name__)

NOT_SOURCES = ("base", "decode", "registry", "vector_files")  # the modules that hold what sources share


@cache
def registry() -> dict[str, DataSource]:
    return found_in(sources, "SOURCES", "data sources", skip=NOT_SOURCES)


def source_of(data_cfg) -> DataSource:
    """The source `data.name` names (its keys unchecked), or one line naming those there are."""
    name = data_cfg.get("name")
    if name not in registry():
        raise bad_value("data.name", name, f"one of {allowed(registry())}")
    return registry()[name]


def has_model(data_cfg) -> bool:
    """Whether the source's vectors come from a model (images to embed), not ready-made."""
    return not isinstance(source_of(data_cfg), VectorSource)


def provide(data_cfg, seed: int = 0) -> ImagesToEmbed | ReadyVectors:
    """What the source provides, checked: its images' splits (listed) or its ready vectors (planned)."""
    source = source_of(data_cfg)
    if isinstance(source, VectorSource):
        check_data(data_cfg)
        return source.provide(data_cfg, seed)
    return ImagesToEmbed(load_splits(data_cfg, seed))


def load_splits(data_cfg, seed: int = 0) -> Splits:
    check_data(data_cfg)
    name = data_cfg.name
    splits = source_of(data_cfg).load(data_cfg, seed)
    gallery = stratified_subset(splits.gallery, data_cfg.get("gallery_limit"))
    queries = stratified_subset(splits.queries, data_cfg.get("query_limit"))
    for image_set in (gallery, queries):
        if len(image_set) == 0:
            raise DataUnavailable(f"the {name} {image_set.split} split has no images")
    return Splits(gallery, queries, splits.titles)


def check_data(data_cfg) -> None:
    """Every data key, before any download, listing or extraction."""
    source = source_of(data_cfg)
    check_common(data_cfg)
    source.check(data_cfg)
