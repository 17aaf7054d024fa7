import os
import sys

import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import sort_faces as cc  # noqa: E402
from cluster_scale import make_faces  # noqa: E402


def unit_rows(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_photos(n, seed):
    """Cannot-link groups that ignore identity, so they do fight the clustering."""
    rng = np.random.default_rng(seed)
    groups = np.full(n, -1)
    faces = rng.permutation(n)[: n // 2]
    groups[faces] = rng.integers(0, n // 8, len(faces))
    return groups


@pytest.fixture(scope="module")
def faces():
    emb, truth, _ = make_faces(3000, seed=0)
    return emb, truth, random_photos(3000, seed=1)


VARIANTS = ["exact", "graph", "graph-ivf", "graph-rounds"]


@pytest.fixture(params=VARIANTS)
def cluster(request, monkeypatch):
    """agglomerate() by one method; the graph path also with its IVF index (used for large N)
    and without its exact per-component stage (used for huge components)."""
    method, _, mode = request.param.partition("-")
    if mode == "ivf":
        monkeypatch.setattr(cc, "_FLAT_PAIRS", 1e5)
    if mode == "rounds":
        monkeypatch.setattr(cc, "EXACT_MAX_FACES", 1)
    return lambda emb, groups: cc.agglomerate(emb, 0.55, groups, method)


@pytest.mark.parametrize("dim,threshold", [(8, 0.3), (16, 0.6), (32, 0.8)])
def test_exact_equals_sklearn(dim, threshold):
    emb = unit_rows(400, dim, seed=dim)
    ref = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                  distance_threshold=threshold).fit_predict(emb)
    labels = cc.agglomerate(emb, threshold, method="exact")
    assert labels.dtype == np.int64
    assert adjusted_rand_score(ref, labels) == 1.0
    assert set(labels) == set(range(labels.max() + 1))


def test_threshold_is_inclusive_distance():
    emb = np.array([[1, 0], [0.8, 0.6]], np.float32)      # cosine distance 0.2
    for method in ("exact", "graph"):
        assert cc.agglomerate(emb, 0.21, method=method).tolist() == [0, 0]
        assert cc.agglomerate(emb, 0.19, method=method).tolist() == [0, 1]
        assert cc.agglomerate(emb, 0.21, np.array([3, 3]), method).tolist() == [0, 1]


def test_tiny_inputs():
    assert cc.agglomerate(np.zeros((0, 4), np.float32), 0.5).shape == (0,)
    assert cc.agglomerate(unit_rows(1, 4, 0), 0.5).tolist() == [0]


def test_cannot_link_never_violated(faces, cluster):
    emb, _, groups = faces
    labels = cluster(emb, groups)
    grouped = groups >= 0
    pairs = np.unique(np.stack([groups[grouped], labels[grouped]], 1), axis=0)
    assert len(pairs) == grouped.sum()                    # one face per (photo, cluster)


def test_graph_agrees_with_exact(faces, cluster):
    emb, truth, groups = faces
    exact = cc.agglomerate(emb, 0.55, groups, "exact")
    assert adjusted_rand_score(truth, exact) > 0.9
    assert adjusted_rand_score(exact, cluster(emb, groups)) >= 0.99


def test_graph_equals_exact_without_constraints(faces):
    emb = faces[0][:1000]
    exact = cc.agglomerate(emb, 0.55, method="exact")
    assert adjusted_rand_score(exact, cc.agglomerate(emb, 0.55, method="graph")) == 1.0


def test_deterministic(faces, cluster):
    emb, _, groups = faces
    first = cluster(emb, groups)
    assert np.array_equal(first, cluster(emb.copy(), groups.copy()))
    firsts = np.unique(first, return_index=True)[1]       # numbered by first appearance
    assert (np.diff(firsts) > 0).all()
