"""FAISS indexes over unit-length keys, searched by inner product (cosine similarity).

flat: exact search. flat-fp16: exact search over the keys stored in float16 (half the memory a search reads; the
similarities move by about 1e-3, so a store is calibrated with the index it serves). faiss scans float16 keys without
BLAS, so a bulk search (a build's leave-one-out) is slower than flat's: 1.58 against 0.50 s over mr's 8,662 keys on 2
cores, and the gap grows with the square of the store; large stores may prefer flat. It is not routed through a flat
copy of the same keys: BLAS sums in another order, similarities differ by up to 1e-5, and near-ties would fall
differently in calibration and in service. hnsw: graph search, efSearch sets recall. ivf: inverted lists, nprobe sets
recall. The reference code never set nprobe and so often found fewer than k neighbours; here nprobe has a real default
and is saved.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import faiss
import numpy as np

from raee.errors import InputError, StoreError
from raee.runtime import thread_count

log = logging.getLogger(__name__)

IndexType = Literal["flat", "flat-fp16", "hnsw", "ivf"]
INDEX_TYPES: tuple[IndexType, ...] = get_args(IndexType)
FEW_QUERIES = 20  # below this many queries FAISS searches one at a time (no BLAS), on one thread
# A search of at most this many query-key pairs (a served batch of 32 over a store of 10,000 items) runs on one
# thread; a bigger one (a build's or an evaluation's bulk search, a big store) on every configured thread.
ONE_THREAD_PAIRS = 32 * 10_000
TIE_DECIMALS = 5  # similarities equal to this many decimals count as tied; ties go to the lower item id
TIE_MARGIN = 8  # extra neighbours fetched so that ties at the k-th place are settled by id


@dataclass(frozen=True)
class IndexSpec:
    type: IndexType = "flat-fp16"  # flat | flat-fp16 | hnsw | ivf
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 200  # HNSW build-time beam
    ef_search: int = 128  # HNSW query-time beam
    nlist: int | None = None  # IVF lists; None = 4 * sqrt(N)
    nprobe: int = 16  # IVF lists visited per query

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise InputError(f"index type {self.type!r} is not one of {', '.join(INDEX_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_index(keys: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """keys: (N, D) float32, unit rows. Returns a CPU index holding them in row order (ids 0..N-1)."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, dim = keys.shape
    index: faiss.Index
    if spec.type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.type == "flat-fp16":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    elif spec.type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = spec.ef_construction
        index = hnsw
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
    """The index moved to every GPU the installed faiss sees (flat, flat-fp16 and IVF); unchanged on CPU builds and
    for HNSW. faiss's GPU code does not take a scalar quantizer without lists, so flat-fp16 goes as a flat index of its
    keys as stored (float16 values held in float32): similarities within 1e-5 of the CPU's, which can order a
    near-tie differently; the memory saving stays on the CPU."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not gpus or isinstance(index, faiss.IndexHNSW):
        return index
    if isinstance(index, faiss.IndexScalarQuantizer):
        flat = faiss.IndexFlatIP(index.d)
        flat.add(keys_of(index))
        index = flat
    log.info("searching on %d GPU(s)", gpus)
    return faiss.index_cpu_to_all_gpus(index)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (Q, k) float32, ids (Q, k) int64; -1 where fewer than k were found), closest first.

    Deterministic: neighbours whose similarities agree to TIE_DECIMALS decimals are ordered by id, and TIE_MARGIN
    extra neighbours are fetched so that such ties at the k-th place are settled by id too. Float noise (a batch
    computed in another order, duplicate keys) then cannot change which neighbours a query gets."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise InputError(f"queries must be (Q, {index.d}), got {queries.shape}")
    if hasattr(faiss, "omp_set_num_threads"):
        small = len(queries) < FEW_QUERIES or len(queries) * index.ntotal <= ONE_THREAD_PAIRS
        # A small search runs on one thread: waking (and then spinning) an OpenMP pool costs more than it saves,
        # and its threads and onnxruntime's spinning pool take the cores from each other. mr's served policy at
        # batch 32 ran 416 texts/s on one thread against 378-384 on two (docs/PERFORMANCE.md).
        faiss.omp_set_num_threads(1 if small else thread_count())
    width = min(k, index.ntotal)
    sims, ids = index.search(queries, min(width + TIE_MARGIN, index.ntotal))
    rounded = -np.round(sims.astype(np.float64), TIE_DECIMALS)
    if (rounded[:, 1:] > rounded[:, :-1]).all():  # strictly closest first, no ties: the sort below is the identity
        return sims[:, :width], ids[:, :width]
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), rounded), axis=-1)
    return (np.take_along_axis(sims, order, axis=1)[:, :width],
            np.take_along_axis(ids, order, axis=1)[:, :width])


def leave_one_out_search(index: faiss.Index, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The index's own items as queries, each without itself or any item of its group (items of identical text):
    (similarities (N, k), ids (N, k)). Searches k plus the largest group wide, so k neighbours remain."""
    groups = np.asarray(groups)
    if len(groups) != index.ntotal:
        raise InputError(f"{len(groups)} group ids for an index of {index.ntotal} items")
    extra = int(np.bincount(groups).max()) if len(groups) else 0
    sims, ids = search(index, keys_of(index), k + extra)
    other = (ids >= 0) & (groups[np.where(ids >= 0, ids, 0)] != groups[:, None])
    order = np.argsort(~other, axis=1, kind="stable")  # kept neighbours first, in their order
    sims = np.where(other, sims, -np.inf)
    ids = np.where(other, ids, -1)
    width = min(k, max(index.ntotal - 1, 0))
    return (np.take_along_axis(sims, order, axis=1)[:, :width].astype(np.float32),
            np.take_along_axis(ids, order, axis=1)[:, :width])


def deserialize_index(data: bytes | bytearray, where: str) -> faiss.Index:
    """An index from the bytes of a keys.faiss file; StoreError naming `where` if they are not one."""
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise StoreError(f"{where}: not a readable FAISS index: {str(exc).splitlines()[0]}") from None


def index_type_of(index: faiss.Index) -> str:
    """flat, flat-fp16, hnsw or ivf for an inner-product index this module builds; "other" for anything else."""
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "other"
    if isinstance(index, faiss.IndexScalarQuantizer):
        return "flat-fp16" if index.sq.qtype == faiss.ScalarQuantizer.QT_fp16 else "other"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "flat" if isinstance(index, faiss.IndexFlat) else "other"
