"""FAISS IVF with scalar-quantised rows (`IndexIVFScalarQuantizer`, inner product): each row kept as one byte per
dimension (sq8: a quarter of IVF-Flat's lists) or two (fp16), trained with the coarse quantizer on the same sample.
Its scores are products with the decoded codes, so the codes, not nprobe alone, bound its recall; refine_factor > 1
re-ranks the best k x F by the full rows read from the gallery store."""
from __future__ import annotations


import faiss

from imgret.index.libraries.faiss_indexes import IVF
from imgret.index.libraries.faiss_quantised import SCALAR_CODES, scalar_type
from imgret.index.params import QUANTISATION, REFINE, MethodParams


class IVFSQ(IVF):
    name, label = "ivfsq", "FAISS IVF-SQ"
    scores_on = recall_bound = "scalar-quantised rows (8-bit or 16-bit float)"
    quantisations = SCALAR_CODES
    params = (*IVF.params, QUANTISATION, REFINE)

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, int(opts["nlist"]), scalar_type(opts),
                                             faiss.METRIC_INNER_PRODUCT)


METHODS = (IVFSQ(),)
