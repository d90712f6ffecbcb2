"""FAISS's indexes, inner-product metric on the L2-normalised store: Flat (exact), IVF-Flat, IVF-PQ, HNSW, and any
index_factory string. Built by `imgret.index.faiss_build` (trained on a sample, filled in chunks from the memory
map, or shard by shard into on-disk inverted lists); query parameters go per call (faiss.SearchParameters), so
threads can search one index at different settings."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import faiss
import numpy as np

from imgret.cache import Unreadable
from imgret.errors import bad_value, whole
from imgret.index.base import Method, SearchIndex
from imgret.index.params import BUILD, QUANTISATION, QUERY, REFINE, HnswGraph, MethodParams, Param
from imgret.index.faiss_build import FaissIndex, build_faiss, on_device, warn_few_training_points


class FaissMethod(Method):
    file_suffix = ".faiss"
    companions = {"lists_file": ".ivfdata"}  # on-disk inverted lists, beside the index
    gpu = True  # has a faiss-gpu copy
    reports_progress = True  # its training and chunked adds have their own bars

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        raise NotImplementedError

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        lists = path.with_suffix(self.companions["lists_file"]) if path is not None else None
        return build_faiss(self.new_index(opts, gallery.shape[1]), opts, gallery, path, self.name, lists)

    def save(self, native: faiss.Index, path: Path) -> None:
        faiss.write_index(native, str(path))

    def load(self, path: Path, opts: MethodParams, meta: dict) -> faiss.Index:
        try:  # on-disk inverted lists are found beside the index, wherever the cache has moved
            return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if "lists_file" in meta else 0)
        except RuntimeError as error:
            raise Unreadable(f"faiss cannot read it: {str(error).strip().splitlines()[-1]}") from error

    def meta(self, native: faiss.Index) -> dict:
        return {"count": int(native.ntotal)}

    def parameters(self, setting: Mapping) -> faiss.SearchParameters | None:
        return None

    def apply(self, native: faiss.Index, setting: Mapping) -> None:
        """Set the query parameters on the index itself (its default for calls without parameters)."""

    def bare(self, native: faiss.Index, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        return native.search(queries, k, params=self._parameters_of(tuple(sorted(setting.items()))))

    @functools.lru_cache(maxsize=32)
    def _parameters_of(self, setting: tuple) -> faiss.SearchParameters | None:
        # made once per setting, as a caller of faiss would: making one per call is a visible share of a fast query
        return self.parameters(dict(setting))

    def results(self, found, k: int):
        return found

    def searcher(self, native: Any, setting: Mapping, device: str = "cpu") -> SearchIndex:
        self.apply(native, setting)
        return on_device(native, setting, device, self.parameters(setting), self.gpu)

    filter_mode = "its own filter (an IDSelectorBitmap in SearchParameters)"

    def filtered_parameters(self, setting: Mapping, selector: faiss.IDSelector) -> faiss.SearchParameters:
        parameters = self.parameters(setting) or faiss.SearchParameters()
        parameters.sel = selector
        return parameters

    def search_filtered(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int,
                        row_filter, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for i, query_id in enumerate(query_ids):  # a selector per query: each has rows of its own
            bits = np.packbits(row_filter.allowed(int(query_id)), bitorder="little")
            selector = faiss.IDSelectorBitmap(len(row_filter.keys), faiss.swig_ptr(bits))
            found = native.search(queries[i:i + 1], k, params=self.filtered_parameters(setting, selector))
            scores[i], ids[i] = found[0][0], found[1][0]
        return scores, ids


class Flat(FaissMethod):
    name, label, exact, cached = "flat", "FAISS Flat", True, False

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        return faiss.IndexFlatIP(dim)


class IVF(FaissMethod):
    name, label = "ivf", "FAISS IVF"
    # nlist and nprobe are bounded by the gallery and by each other (below); train_size is faiss_build's
    params = (Param("nlist", BUILD, minimum=None, top_level=True), Param("train_size", BUILD, minimum=None),
              Param("on_disk", BUILD, minimum=None, execution=True), Param("nprobe", QUERY, minimum=None, top_level=True))
    variant_param = "nprobe"

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, int(opts["nlist"]), faiss.METRIC_INNER_PRODUCT)

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        nlist, nprobe = opts.get("nlist"), opts.get("nprobe")
        if not whole(nlist, 1, gallery_size):
            raise bad_value("nlist", nlist, f"a whole number from 1 to the gallery size ({gallery_size})"
                            if gallery_size else "a whole number >= 1")
        if not whole(nprobe, 1, nlist):
            raise bad_value("nprobe", nprobe, f"a whole number from 1 to nlist ({nlist})")
        if gallery_size:
            warn_few_training_points(gallery_size, nlist, "nlist")
        check_on_disk(opts)

    def invalid_combination(self, opts: MethodParams) -> str | None:
        nprobe, nlist = opts.get("nprobe"), opts.get("nlist")
        if isinstance(nprobe, int) and isinstance(nlist, int) and nprobe > nlist:
            return f"nprobe={nprobe} > nlist={nlist}"
        return None

    def parameters(self, setting: Mapping) -> faiss.SearchParameters | None:
        return faiss.SearchParametersIVF(nprobe=int(setting["nprobe"])) if "nprobe" in setting else None

    def apply(self, native: faiss.Index, setting: Mapping) -> None:
        if "nprobe" in setting:
            faiss.extract_index_ivf(native).nprobe = int(setting["nprobe"])


class IVFPQ(IVF):
    name, label = "ivfpq", "FAISS IVF-PQ"
    scores_on = recall_bound = "product-quantised codes"
    # refine_factor: imgret.index.refine re-ranks k x factor from the store
    params = (IVF.params[0], Param("pq_m", BUILD, minimum=None), Param("pq_nbits", BUILD, minimum=None),
              *IVF.params[1:], QUANTISATION, REFINE)
    quantisations = {"pq": "product-quantised codes"}

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        if dim % int(opts["pq_m"]):
            self.check(opts, None, dim)  # raises, naming the divisors of dim
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, int(opts["nlist"]), int(opts["pq_m"]),
                                int(opts["pq_nbits"]), faiss.METRIC_INNER_PRODUCT)

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        if not whole(opts.get("pq_nbits"), 1, 16):
            raise bad_value("method.pq_nbits", opts.get("pq_nbits"), "a whole number of bits from 1 to 16")
        pq_m = opts.get("pq_m")
        if not whole(pq_m, 1) or (dim and dim % pq_m):
            raise bad_value("method.pq_m", pq_m, "a whole number of sub-quantizers that divides the "
                            f"embedding dimension{f' ({dim}): one of {_divisors(dim)}' if dim else ''}")
        if gallery_size:
            warn_few_training_points(gallery_size, 2 ** opts["pq_nbits"], "2**pq_nbits")


class HNSW(HnswGraph, FaissMethod):
    name, label = "hnsw", "FAISS HNSW"
    gpu = False  # faiss-gpu has no HNSW

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        index = faiss.IndexHNSWFlat(dim, int(opts["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(opts["ef_construction"])
        return index

    def parameters(self, setting: Mapping) -> faiss.SearchParameters | None:
        return faiss.SearchParametersHNSW(efSearch=int(setting["ef_search"])) if "ef_search" in setting else None

    def apply(self, native: faiss.Index, setting: Mapping) -> None:
        if "ef_search" in setting:
            native.hnsw.efSearch = int(setting["ef_search"])


class Factory(FaissMethod):
    name, label = "factory", "faiss index_factory"
    params = (Param("index_factory", BUILD, minimum=None), *IVF.params[1:3], Param("search_params", QUERY, minimum=None))
    unnamed_params = ("index_factory",)  # commas and slashes: the cache file's digest stands for it

    filter_mode = Method.filter_mode  # its parameters are set on the index, not per call: post-filtered

    def setting_words(self, opts: MethodParams, keys) -> list[str]:
        return [str(opts[key]) for key in keys]  # the factory string names itself

    def search_filtered(self, *args, **kwargs):
        return Method.search_filtered(self, *args, **kwargs)

    def choice_label(self, setting: Mapping) -> str:
        return f"factory {setting['index_factory']}"

    def new_index(self, opts: MethodParams, dim: int) -> faiss.Index:
        try:
            return faiss.index_factory(dim, str(opts["index_factory"]), faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise bad_value("method.index_factory", opts["index_factory"],
                            f"a faiss index_factory string that builds for dimension {dim} "
                            f"({str(error).strip().splitlines()[-1]})") from error

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        # Without the dimension, check the grammar with one that every common sub-quantizer count divides.
        index = self.new_index(opts, dim or 8 * 3 * 5 * 7 * 16)
        self.apply(index, opts)
        check_on_disk(opts)
        if opts.get("on_disk") and faiss.try_extract_index_ivf(index) is None:
            raise bad_value("method.on_disk", True, f"false for {opts['index_factory']}, which has no inverted "
                            "lists (only IVF indexes keep them on disk)")

    def apply(self, native: faiss.Index, setting: Mapping) -> None:
        if not setting.get("search_params"):
            return
        try:
            faiss.ParameterSpace().set_index_parameters(native, str(setting["search_params"]))
        except RuntimeError as error:
            raise bad_value("method.search_params", setting["search_params"],
                            f"'name=value' pairs, comma-separated, that the index has, such as nprobe or efSearch "
                            f"({str(error).strip().splitlines()[-1]})") from error


def check_on_disk(opts: MethodParams) -> None:
    if not isinstance(opts.get("on_disk", False), bool):
        raise bad_value("method.on_disk", opts.get("on_disk"), "true (inverted lists in a file beside the index, "
                        "memory-mapped) or false")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 128)


METHODS = (Flat(), IVF(), IVFPQ(), HNSW(), Factory())
