"""Exact search without an index: the gallery's rows scored by matrix products, the k best kept by a partial
top-k. Brute force is the reference every approximate method is measured against, and the ground truth's engine."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from imgret.mapped import is_mapped, release_pages
from imgret.index.base import ADD_CHUNK_ROWS

def streamed_top_k(gallery: np.ndarray, queries: np.ndarray, k: int, block_rows: int = ADD_CHUNK_ROWS,
                   query_chunk: int = 1024, progress: str | None = None, masks=None, release: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each query's k largest inner products with the gallery, best first, in float32: one pass
    over the gallery in blocks of `block_rows` (each block's pages released after it, unless `release` is False),
    each block's top-k merged into every query's best k. Memory is bounded by the blocks, not the gallery.
    `progress`: a bar's label. `masks(q_start, q_stop, start, stop)`: which of rows start..stop queries
    q_start..q_stop may return (a boolean block), the others scored -inf (a filter)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = torch.full((len(queries), k), -torch.inf)
    best_ids = torch.zeros((len(queries), k), dtype=torch.int64)
    blocks = range(0, len(gallery), block_rows)
    for start in tqdm(blocks, desc=progress, unit="block", disable=progress is None, mininterval=2):
        block = np.ascontiguousarray(gallery[start:start + block_rows], dtype=np.float32)
        for q in range(0, len(queries), query_chunk):
            # one query: a matrix-vector product (the unfiltered single query's own call)
            similarities = (block @ queries[q])[None] if len(queries) == 1 else queries[q:q + query_chunk] @ block.T
            if masks is not None:
                np.copyto(similarities, -np.inf, where=~masks(q, q + len(similarities), start, start + len(block)))
            top = torch.topk(torch.from_numpy(similarities), min(k, len(block)), dim=1)
            scores = torch.cat([best_scores[q:q + query_chunk], top.values], dim=1)
            ids = torch.cat([best_ids[q:q + query_chunk], top.indices + start], dim=1)
            merged = torch.topk(scores, k, dim=1, largest=True, sorted=True)
            best_scores[q:q + query_chunk] = merged.values
            best_ids[q:q + query_chunk] = torch.gather(ids, 1, merged.indices)
        if release:
            release_pages(gallery, start, start + len(block))
    return best_scores.numpy(), best_ids.numpy()


def in_memory(gallery: np.ndarray) -> np.ndarray:
    """The gallery as a C-contiguous float32 array in this process's memory: itself when it is one already, else a
    copy (of a memory-mapped store)."""
    if not is_mapped(gallery) and gallery.dtype == np.float32 and gallery.flags.c_contiguous:
        return gallery
    return np.array(gallery, dtype=np.float32, order="C")


class BruteForceIndex:
    """Exact cosine: chunked matrix products and a partial top-k (torch.topk, no full sort).

    A gallery up to `resident_bytes` is copied into RAM; a larger one stays memory-mapped and is streamed in
    blocks of `block_rows`, each block's pages released after it, so memory does not grow with the gallery.
    The products go through numpy's BLAS (OpenBLAS), which beat torch's MKL here both batched and for single
    queries when the two were compared (`python -m imgret.bench --parts search` measures this choice against
    the matmul peak, the bandwidth limit and faiss). torch.topk selects from the scores without copying them.
    """

    def __init__(self, gallery: np.ndarray, query_chunk: int = 1024, device: str = "cpu",
                 resident_bytes: int = 1 << 30, block_rows: int = ADD_CHUNK_ROWS):
        self.streamed = device == "cpu" and gallery.nbytes > resident_bytes
        self.gallery = gallery if self.streamed else in_memory(gallery)
        self.query_chunk = query_chunk
        self.block_rows = block_rows
        # on a GPU the products and the selection run there, with torch
        self.gallery_on_device = torch.from_numpy(self.gallery).to(device) if device != "cpu" else None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.gallery_on_device is not None:
            return self._search_on_device(queries, k)
        if self.streamed:
            return self._search_streamed(queries, k)
        if len(queries) == 1:  # matrix-vector: bandwidth-bound, one pass over the gallery
            top = torch.topk(torch.from_numpy(self.gallery @ queries[0]), k, largest=True, sorted=True)
            return top.values.numpy()[None], top.indices.numpy()[None]
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.query_chunk):
            similarities = queries[start:start + self.query_chunk] @ self.gallery.T
            top = torch.topk(torch.from_numpy(similarities), k, dim=1, largest=True, sorted=True)
            scores[start:start + len(similarities)] = top.values.numpy()
            ids[start:start + len(similarities)] = top.indices.numpy()
        return scores, ids

    def _search_streamed(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One pass over the gallery, block by block: each block's top-k merged into every query's best k."""
        return streamed_top_k(self.gallery, queries, k, self.block_rows, self.query_chunk)

    def _search_on_device(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        with torch.inference_mode():
            for start in range(0, len(queries), self.query_chunk):
                chunk = torch.from_numpy(queries[start:start + self.query_chunk]).to(self.gallery_on_device.device)
                top = torch.topk(chunk @ self.gallery_on_device.T, k, dim=1, largest=True, sorted=True)
                scores.append(top.values.cpu().numpy())
                ids.append(top.indices.cpu().numpy())
        return np.concatenate(scores), np.concatenate(ids)

    @property
    def nbytes(self) -> int:
        return self.gallery.nbytes
