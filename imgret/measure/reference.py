"""How far a vector file's own neighbours agree with imgret's exact ground truth (ann-benchmarks files carry
their `neighbors`): checked once its stores exist, recorded as the run's `reference_*` tags."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from imgret.embed.store import EmbeddingStore
from imgret.index.groundtruth import exact_top_k
from imgret.measure.metrics import recall_at
from imgret.sources.vector_files import open_vectors
from imgret.sources.vectors import VectorFilesSettings

log = logging.getLogger(__name__)

REFERENCE_CHECK_QUERIES = 200  # queries whose exact top-10 is compared with an ann-benchmarks file's neighbors


def reference_check(data: VectorFilesSettings, gallery: EmbeddingStore, queries: EmbeddingStore) -> dict | None:
    """For an ann-benchmarks file whose metric is imgret's own (angular = cosine): how many of the file's
    top-10 neighbors imgret's exact top-10 has, over the first REFERENCE_CHECK_QUERIES queries. For another
    metric the file's neighbors answer a different question, which is said and not checked."""
    if data.queries:  # the vector files source's settings
        return None
    source = open_vectors(Path(str(data.gallery)).expanduser())
    if "neighbors" not in source.extras:
        return None
    distance = source.extras["distance"]
    if distance != "angular":
        log.warning("%s ranks neighbors by %s distance on its raw vectors; imgret searches by cosine similarity "
                    "of L2-normalised vectors, so its exact ground truth differs from the file's and the file's "
                    "neighbors are not checked", source.path.name, distance)
        return {"distance": distance, "checked": False}
    count = min(REFERENCE_CHECK_QUERIES, len(queries))
    depth = min(10, len(gallery), source.extras["neighbors"].shape[1])
    _, ids = exact_top_k(gallery.vectors, np.asarray(queries.vectors[:count]), depth, progress=False)
    agreement = recall_at(ids, np.asarray(source.extras["neighbors"][:count, :depth]), depth)
    log.info("%s: imgret's exact top-%d holds %.4f of the file's own neighbors (first %d queries)",
             source.path.name, depth, agreement, count)
    return {"distance": distance, "checked": True, "queries": count, "depth": depth, "agreement": agreement}
