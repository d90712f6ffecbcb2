"""FAISS IVF with 8-bit scalar-quantised rows (`IndexIVFScalarQuantizer`, `QT_8bit`, inner product): each row kept
as one byte per dimension, a quarter of IVF-Flat's lists, trained with the coarse quantizer on the same sample.
Its scores are products with the decoded codes, so the codes, not nprobe alone, bound its recall."""
from __future__ import annotations


import faiss

from imgret.index.libraries.faiss_indexes import IVF
from imgret.index.params import MethodParams


class IVFSQ8(IVF):
    name, label = "ivfsq", "FAISS IVF-SQ8"
    scores_on = recall_bound = "8-bit scalar-quantised rows"

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, int(opts["nlist"]),
                                             faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)


METHODS = (IVFSQ8(),)
