"""FAISS indexes against brute force on seeded synthetic keys."""

from __future__ import annotations

import numpy as np
import pytest

from raee.errors import InputError
from raee.index import IndexSpec, build_index, keys_of, search


@pytest.fixture(scope="module")
def keys():
    """Clustered unit keys (sentence embeddings cluster by topic), and queries drawn the same way."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    xb = (centres[rng.integers(0, 40, 2000)] + 0.5 * rng.normal(size=(2000, 32))).astype(np.float32)
    xq = (centres[rng.integers(0, 40, 50)] + 0.5 * rng.normal(size=(50, 32))).astype(np.float32)
    return xb / np.linalg.norm(xb, axis=1, keepdims=True), xq / np.linalg.norm(xq, axis=1, keepdims=True)


def brute_force(xb, xq, k):
    sims = xq @ xb.T
    ids = np.argsort(-sims, axis=1)[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def test_flat_is_exact(keys):
    xb, xq = keys
    D, I = search(build_index(xb, IndexSpec("flat")), xq, 12)
    D_ref, I_ref = brute_force(xb, xq, 12)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_have_high_recall(kind, keys):
    xb, xq = keys
    _, I = search(build_index(xb, IndexSpec(kind)), xq, 12)
    _, I_ref = brute_force(xb, xq, 12)
    recall = np.mean([len(set(a) & set(b)) / 12 for a, b in zip(I, I_ref)])
    assert recall >= 0.9


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_keys_come_back_in_id_order(kind, keys):
    xb, _ = keys
    np.testing.assert_allclose(keys_of(build_index(xb, IndexSpec(kind))), xb, atol=1e-6)


def test_wrong_query_shape_and_unknown_type_are_refused(keys):
    xb, xq = keys
    with pytest.raises(InputError, match=r"\(Q, 32\)"):
        search(build_index(xb, IndexSpec()), xq[:, :16], 3)
    with pytest.raises(InputError, match="flat, hnsw, ivf"):
        IndexSpec("lsh")
