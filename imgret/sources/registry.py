"""Every data source by name (conf/data/<name>.yaml), found where it lives: the `SOURCES` of each module of
imgret/sources (one module per source, or per family of sources, as vectors.py holds two). An image source lists
its splits for a model to embed; a vector source plans ready stores. A new source is one module and one yaml."""
from __future__ import annotations

import logging
from functools import cache

from imgret import sources
from imgret.errors import DataUnavailable, allowed, bad_value
from imgret.plugins import found_in
from imgret.sources.base import (DataSource, ImageSettings, ImagesToEmbed, ReadyVectors, SourceSettings, Splits,
                                 VectorSource, check_common, stratified_subset)

log = logging.getLogger(__name__)

NOT_SOURCES = ("base", "decode", "registry", "vector_files")  # the modules that hold what sources share


@cache
def registry() -> dict[str, DataSource]:
    return found_in(sources, "SOURCES", "data sources", skip=NOT_SOURCES)


def source_of(data) -> DataSource:
    """The source `data.name` names (its keys unchecked), or one line naming those there are."""
    name = data.name if isinstance(data, SourceSettings) else data.get("name")
    if name not in registry():
        raise bad_value("data.name", name, f"one of {allowed(registry())}")
    return registry()[name]


def settings_of(data) -> SourceSettings:
    """A data config section (or settings) as its source's typed settings, unchecked."""
    return source_of(data).settings.of(data)


def has_model(data) -> bool:
    """Whether the source's vectors come from a model (images to embed), not ready-made."""
    return not isinstance(source_of(data), VectorSource)


def provide(data, seed: int = 0) -> ImagesToEmbed | ReadyVectors:
    """What the source provides, checked: its images' splits (listed) or its ready vectors (planned)."""
    source = source_of(data)
    if isinstance(source, VectorSource):
        settings = check_data(data)
        return source.provide(settings, seed)
    return ImagesToEmbed(load_splits(data, seed))


def load_splits(data, seed: int = 0) -> Splits:
    settings = check_data(data)
    splits = source_of(settings).load(settings, seed)
    gallery = stratified_subset(splits.gallery, settings.gallery_limit)
    queries = stratified_subset(splits.queries, settings.query_limit)
    for image_set in (gallery, queries):
        if len(image_set) == 0:
            raise DataUnavailable(f"the {settings.name} {image_set.split} split has no images")
    return Splits(gallery, queries, splits.titles)


def check_data(data) -> SourceSettings:
    """Every data key, before any download, listing or extraction; the settings checked."""
    source = source_of(data)
    settings = source.settings.of(data)
    if isinstance(settings, ImageSettings):
        check_common(settings)
    source.check(settings)
    return settings
