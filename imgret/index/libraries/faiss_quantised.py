"""FAISS's quantised codes for a whole gallery, inner-product metric on the L2-normalised store: the rows kept as
8-bit scalar or 16-bit float codes, scanned flat (`sq`: IndexScalarQuantizer) or under an HNSW graph (`hnsw_sq`:
IndexHNSWSQ), or as one bit a dimension (`binary`: IndexLSH's thresholded bits, Hamming distance). Their scores
come from the codes, so the codes bound their recall; `refine_factor` > 1 re-ranks each query's best k x F by the
full rows read back from the gallery store (imgret.index.refine), as faiss's IndexRefine would from a second copy."""
from __future__ import annotations

from typing import Any, Mapping

import faiss
import numpy as np

from imgret.index.base import Method, SearchIndex
from imgret.index.libraries.faiss_indexes import HNSW, FaissMethod
from imgret.index.params import BUILD, QUANTISATION, REFINE, MethodParams, Param

SCALAR_CODES = {"sq8": "QT_8bit", "fp16": "QT_fp16"}


def scalar_type(opts: MethodParams) -> int:
    return getattr(faiss.ScalarQuantizer, SCALAR_CODES[opts.get("quantisation") or "sq8"])


class ScalarQuantized(FaissMethod):
    name, label = "sq", "FAISS SQ (flat scan of codes)"
    scores_on = recall_bound = "scalar-quantised rows (8-bit or 16-bit float)"
    quantisations = SCALAR_CODES
    params = (QUANTISATION, Param("train_size", BUILD, minimum=None), REFINE)

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        return faiss.IndexScalarQuantizer(dim, scalar_type(opts), faiss.METRIC_INNER_PRODUCT)


class HnswScalarQuantized(HNSW):
    name, label = "hnsw_sq", "FAISS HNSW-SQ"
    scores_on = recall_bound = "scalar-quantised rows (8-bit or 16-bit float)"
    quantisations = SCALAR_CODES
    params = (*HNSW.params, QUANTISATION, Param("train_size", BUILD, minimum=None), REFINE)

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        index = faiss.IndexHNSWSQ(dim, scalar_type(opts), int(opts["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(opts["ef_construction"])
        return index


class SignBits(FaissMethod):
    """Each row as one bit a dimension, set where the row's value exceeds that dimension's threshold, the thresholds
    trained on a sample (faiss.IndexLSH without rotation, `train_thresholds`: their medians, so that every bit
    splits the gallery; raw signs would not, for features that are never negative), searched by Hamming distance
    over the codes: 32 times fewer bytes than the rows. The score is 1 - 2 x (distance / dimensions): the share of
    bits the row shares with the query, in [-1, 1], in the distance's order."""

    name, label = "binary", "FAISS binary (median-threshold bits, Hamming)"
    scores_on = recall_bound = "one bit a dimension (Hamming distance)"
    quantisations = {"binary": "bits"}
    params = (QUANTISATION, Param("train_size", BUILD, minimum=None), REFINE)
    filter_mode = Method.filter_mode  # post-filtered: faiss's binary codes take no selector here

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        return faiss.IndexLSH(dim, dim, False, True)

    def searcher(self, native: Any, setting: Mapping, device: str = "cpu") -> SearchIndex:
        return Method.searcher(self, native, setting, device)  # its distances turned into scores (results)

    def search_filtered(self, *args, **kwargs):
        return Method.search_filtered(self, *args, **kwargs)

    def bare(self, native: faiss.Index, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        return native.search(queries, k), native.nbits

    def results(self, found, k: int):
        (distances, ids), bits = found
        return np.where(ids >= 0, 1 - 2 * distances / bits, -np.inf).astype(np.float32), ids


METHODS = (ScalarQuantized(), HnswScalarQuantized(), SignBits())
