"""FAISS indexes over unit-length keys, searched by inner product (cosine similarity).

flat: exact search. hnsw: graph search, efSearch sets recall. ivf: inverted lists, nprobe sets recall. The reference
code never set nprobe and so often found fewer than k neighbours; here nprobe has a real default and is saved.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from raee.errors import InputError, StoreError

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw", "ivf")


@dataclass(frozen=True)
class IndexSpec:
    type: str = "flat"  # flat | hnsw | ivf
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 200  # HNSW build-time beam
    ef_search: int = 128  # HNSW query-time beam
    nlist: int | None = None  # IVF lists; None = 4 * sqrt(N)
    nprobe: int = 16  # IVF lists visited per query

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise InputError(f"index type {self.type!r} is not one of {', '.join(INDEX_TYPES)}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_index(keys: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """keys: (N, D) float32, unit rows. Returns a CPU index holding them in row order (ids 0..N-1)."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, dim = keys.shape
    if spec.type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        nlist = spec.nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(keys)
    index.add(keys)
    configure_search(index, spec)
    return index


def configure_search(index: faiss.Index, spec: IndexSpec) -> None:
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = spec.ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(spec.nprobe, index.nlist)


def keys_of(index: faiss.Index) -> np.ndarray:
    """(N, D) the keys an index holds, in id order (used to merge shards)."""
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def on_best_device(index: faiss.Index) -> faiss.Index:
    """The index moved to every GPU the installed faiss sees (flat and IVF); unchanged on CPU builds."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus and not isinstance(index, faiss.IndexHNSW):
        log.info("searching on %d GPU(s)", gpus)
        return faiss.index_cpu_to_all_gpus(index)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (Q, k) float32, ids (Q, k) int64; -1 where fewer than k were found)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise InputError(f"queries must be (Q, {index.d}), got {queries.shape}")
    return index.search(queries, min(k, index.ntotal))


def deserialize_index(data: bytes | bytearray, where: str) -> faiss.Index:
    """An index from the bytes of a keys.faiss file; StoreError naming `where` if they are not one."""
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise StoreError(f"{where}: not a readable FAISS index: {str(exc).splitlines()[0]}") from None


def index_type_of(index: faiss.Index) -> str:
    """flat, hnsw or ivf for an inner-product index this module builds; "other" for anything else."""
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "other"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "flat" if isinstance(index, faiss.IndexFlat) else "other"
