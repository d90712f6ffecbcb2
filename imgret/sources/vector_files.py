"""Embeddings researchers already have, read without loading them: every reader returns a 2-D array-like whose
slices are read from disk (numpy memory maps, or an HDF5 dataset), so a gallery of any size is copied into a
store a chunk at a time.

Formats, by the path's ending:
  .npy                      float32, float16 or float64, shape (n, d)
  .fvecs / .bvecs           TEXMEX (SIFT1M, GIST1M): per row an int32 dimension, then d float32 / uint8
  .fbin / .u8bin / .i8bin   big-ann-benchmarks: int32 n, int32 d, then n x d float32 / uint8 / int8
  .hdf5 / .h5               ann-benchmarks: `train` (gallery), `test` (queries), `neighbors`, attribute `distance`
  a folder                  clip-retrieval's output: img_emb/img_emb_*.npy in order (and metadata/*.parquet)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FILE_FORMATS = (".npy", ".fvecs", ".bvecs", ".fbin", ".u8bin", ".i8bin", ".hdf5", ".h5")
BIN_TYPES = {".fbin": np.float32, ".u8bin": np.uint8, ".i8bin": np.int8}
VECS_TYPES = {".fvecs": np.float32, ".bvecs": np.uint8}

class VectorFileError(ValueError):
    """The file is not what its ending says (the message says what was found)."""

@dataclass
class VectorFile:
    rows: object  # 2-D: a numpy array or memory map, an h5py dataset, or Concatenated
    path: Path
    kind: str
    extras: dict = field(default_factory=dict)  # ann-benchmarks: queries, neighbors, distance; clip-retrieval: names

    @property
    def count(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

class Concatenated:
    """Several 2-D memory maps read as one, row ranges spanning file boundaries."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1]))

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        pieces = []
        for part, first in zip(self.parts, self.starts):
            low, high = max(start, first), min(stop, first + len(part))
            if low < high:
                pieces.append(np.asarray(part[low - first:high - first]))
        return np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), dtype=self.parts[0].dtype)

def _npy(path: Path) -> np.ndarray:
    try:
        rows = np.load(path, mmap_mode="r")
    except ValueError as error:
        raise VectorFileError(f"numpy cannot memory-map it ({error})") from error
    if rows.ndim != 2 or rows.dtype.kind not in "fiu":
        raise VectorFileError(f"it holds a {rows.ndim}-D {rows.dtype} array, not (vectors, dimension) numbers")
    return rows

def _vecs(path: Path, dtype) -> np.ndarray:
    size = path.stat().st_size
    if size < 4:
        raise VectorFileError("it is shorter than one row's header")
    dim = int(np.fromfile(path, dtype=np.int32, count=1)[0])
    row_bytes = 4 + dim * np.dtype(dtype).itemsize
    if dim < 1 or size % row_bytes:
        raise VectorFileError(f"its first row says dimension {dim}, which does not divide its {size} bytes into rows")
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, row_bytes)
    if len(raw) and not np.all(raw[[0, -1], :4].copy().view(np.int32) == dim):
        raise VectorFileError("its rows do not all start with the same dimension")
    return raw[:, 4:].view(dtype) if dtype is not np.uint8 else raw[:, 4:]

def _bin(path: Path, dtype) -> np.ndarray:
    header = np.fromfile(path, dtype=np.int32, count=2)
    if len(header) < 2:
        raise VectorFileError("it is shorter than its 8-byte header")
    count, dim = (int(v) for v in header)
    expected = 8 + count * dim * np.dtype(dtype).itemsize
    if count < 1 or dim < 1 or path.stat().st_size != expected:
        raise VectorFileError(f"its header says {count} x {dim}, which needs {expected} bytes, "
                              f"not {path.stat().st_size}")
    return np.memmap(path, dtype=dtype, mode="r", offset=8, shape=(count, dim))

def _hdf5(path: Path) -> VectorFile:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise VectorFileError(f"h5py cannot open it ({error})") from error
    if "train" not in handle:
        raise VectorFileError(f"it has no `train` dataset (it has: {', '.join(handle) or 'nothing'}); "
                              "ann-benchmarks files hold train, test and neighbors")
    extras = {"distance": str(handle.attrs.get("distance", "unknown"))}
    if "test" in handle:
        extras["queries"] = handle["test"]
    if "neighbors" in handle:
        extras["neighbors"] = handle["neighbors"]
    return VectorFile(handle["train"], path, "ann-benchmarks HDF5", extras)

def _clip_retrieval(folder: Path) -> VectorFile:
    parts = sorted((folder / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not parts:
        raise VectorFileError("it is a folder without img_emb/img_emb_<n>.npy files (clip-retrieval's layout)")
    arrays = [_npy(part) for part in parts]
    if len({a.shape[1] for a in arrays}) > 1:
        raise VectorFileError(f"its img_emb files have different dimensions: {sorted({a.shape[1] for a in arrays})}")
    extras = {}
    metadata = sorted((folder / "metadata").glob("metadata_*.parquet"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if len(metadata) == len(parts):
        extras["metadata"] = metadata
    return VectorFile(Concatenated(arrays), folder, "clip-retrieval embeddings", extras)

def open_vectors(path) -> VectorFile:
    """The vectors at `path`, by its ending; VectorFileError says what is wrong with a file that does not fit."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _clip_retrieval(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return VectorFile(_npy(path), path, "numpy array")
    if suffix in VECS_TYPES:
        return VectorFile(_vecs(path, VECS_TYPES[suffix]), path, f"TEXMEX {suffix}")
    if suffix in BIN_TYPES:
        return VectorFile(_bin(path, BIN_TYPES[suffix]), path, f"big-ann-benchmarks {suffix}")
    if suffix in (".hdf5", ".h5"):
        return _hdf5(path)
    raise VectorFileError(f"its ending {suffix or '(none)'} is not one of {', '.join(FILE_FORMATS)} (or a "
                          "clip-retrieval folder)")

def clip_retrieval_names(vector_file: VectorFile) -> list[str] | None:
    """The image path (or URL) of each row, from clip-retrieval's metadata parquet files, if pyarrow can read them."""
    files = vector_file.extras.get("metadata")
    if not files:
        return None
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        return None
    names = []
    for file in files:
        table = parquet.read_table(file)
        column = next((c for c in ("image_path", "url") if c in table.column_names), None)
        if column is None:
            return None
        names += [str(value) for value in table.column(column).to_pylist()]
    return names if len(names) == vector_file.count else None

