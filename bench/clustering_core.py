"""Clustering primitives: average-linkage agglomeration of face embeddings under cosine distance.

For L2-normalised rows the average pairwise cosine similarity of clusters A and B equals
dot(m_A, m_B) with m = unnormalised mean vector, so every cluster is just (mean, size).
Average linkage is reducible (sim(A+B, C) <= max(sim(A, C), sim(B, C))), and stays so when
cannot-link pairs get similarity -inf; hence merging reciprocal nearest neighbours in any
order (nearest-neighbour chain, or all mutual pairs per round) reproduces the classic
"always merge the most similar allowed pair" result, and a cluster whose best partner is
below the threshold can be frozen for good.
"""
import os

import faiss
import numpy as np

EXACT_MAX_FACES = 20000   # above this, no N×N matrix
_LIST = 32                # candidate partners remembered per cluster (graph path)
_FLAT_PAIRS = 4e8         # query×base pairs searched brute force; above this use the IVF index
_NPROBE = 8               # IVF lists probed per query
_CHUNK = 1 << 16          # rows gathered at a time, to keep temporaries small


def agglomerate(emb: np.ndarray, threshold: float, groups: np.ndarray | None = None,
                method: str = "auto") -> np.ndarray:
    """Average-linkage agglomerative clustering under cosine distance.
    emb: (N, D) float32 L2-normalised rows. threshold: cosine distance; clusters merge while
    their average pairwise cosine distance is <= threshold. groups: (N,) int, faces with the same
    group id (same photo) must never end in one cluster (cannot-link), -1 = no constraint.
    method: "exact" (small N), "graph" (scalable), "auto" (exact when N <= EXACT_MAX_FACES).
    Returns (N,) int64 labels 0..K-1, deterministic."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    groups = np.full(n, -1, np.int64) if groups is None else np.asarray(groups, np.int64)
    if method == "auto":
        method = "exact" if n <= EXACT_MAX_FACES else "graph"
    if method not in ("exact", "graph"):
        raise ValueError(f"unknown method {method!r}")
    if n < 2:
        return np.zeros(n, np.int64)
    run = _exact if method == "exact" else _graph
    return _relabel(run(emb, np.float32(1.0 - threshold), groups))


def _relabel(parent):
    """Union-find parents -> labels numbered by first occurrence (independent of internal ids)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    _, first, inverse = np.unique(parent, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def _group_pairs(groups):
    """(P, 2) face pairs that share a photo."""
    idx = np.flatnonzero(groups >= 0)
    idx = idx[np.argsort(groups[idx], kind="stable")]
    g, pairs = groups[idx], [np.empty((0, 2), np.int64)]
    for d in range(1, len(idx)):          # sorted groups: members of a group are d apart
        same = g[:-d] == g[d:]
        if not same.any():
            break
        pairs.append(np.stack([idx[:-d][same], idx[d:][same]], 1))
    return np.concatenate(pairs)


# ---------------------------------------------------------------- exact: dense NN-chain
def _exact(emb, s_min, groups):
    n = len(emb)
    sim = emb @ emb.T                     # numpy uses syrk for x @ x.T: exactly symmetric
    np.fill_diagonal(sim, -np.inf)
    gp = _group_pairs(groups)
    sim[gp[:, 0], gp[:, 1]] = sim[gp[:, 1], gp[:, 0]] = -np.inf   # cannot-link
    size, parent, alive = np.ones(n), np.arange(n), np.ones(n, bool)
    chain, start = [], 0
    while True:
        if not chain:
            while start < n and not alive[start]:
                start += 1
            if start == n:
                break
            chain.append(start)
        a = chain[-1]
        row = sim[a]
        b = int(row.argmax())
        if len(chain) > 1 and row[chain[-2]] >= row[b]:
            b = chain[-2]                 # on ties go back, so the chain cannot cycle
        if row[b] < s_min:                # best partner too far: by reducibility, never merges
            alive[a] = False
            chain.pop()
        elif len(chain) > 1 and b == chain[-2]:
            del chain[-2:]
            i, j = min(a, b), max(a, b)   # reciprocal nearest neighbours: merge j into i
            new = ((size[i] * sim[i] + size[j] * sim[j]) / (size[i] + size[j])).astype(np.float32)
            new[[i, j]] = -np.inf         # -inf (dead, cannot-link) propagates through the mean
            sim[i], sim[:, i], sim[j], sim[:, j] = new, new, -np.inf, -np.inf
            size[i] += size[j]
            alive[j], parent[j] = False, i
        else:
            chain.append(b)
    return parent


# ---------------------------------------------------------------- graph: mutual-NN rounds
def _graph(emb, s_min, groups):
    """Rounds of "merge all mutual best pairs", memory O(N·(D + _LIST)).
    Each cluster keeps up to _LIST candidate partners with exact similarities and `bound`,
    an upper bound on its similarity to every cluster not listed (reducibility keeps it valid
    through merges). It is re-searched only when an unlisted cluster could beat its best."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    n = len(emb)
    means, size, parent = emb.copy(), np.ones(n, np.float32), np.arange(n)
    cand = np.repeat(np.arange(n, dtype=np.int64)[:, None], _LIST, 1)   # self = empty slot
    csim = np.full((n, _LIST), -np.inf, np.float32)
    bound = np.full(n, np.inf, np.float32)
    gpairs = _group_pairs(groups)
    keys = _conflict_keys(gpairs, parent, n)
    ivf = _IVF(emb) if float(n) * n > _FLAT_PAIRS else None
    active = np.arange(n)
    while len(active) > 1:
        _refresh(active, cand, csim, parent, means, keys, n)
        bid, bsim = _best(cand[active], csim[active])
        need = active[(bound[active] > bsim) & (bound[active] >= s_min)]
        if len(need):
            _search(need, active, cand, csim, bound, means, keys, ivf, s_min)
            bid, bsim = _best(cand[active], csim[active])
        ok = bsim >= s_min
        best = np.full(n, -1)
        best[active[ok]] = bid[ok]
        a, b = active[ok], bid[ok]
        mutual = (best[b] == a) & (a < b)
        a, b = a[mutual], b[mutual]
        if not len(a):
            break
        keys = _merge(a, b, means, size, parent, cand, csim, bound, gpairs, ivf)
        active = active[ok & (parent[active] == active)]   # drop frozen and merged-away
    return parent


def _best(cand, csim):
    """Best listed partner per row; ties go to the lowest id so mutual pairs always exist."""
    bsim = csim.max(1)
    return np.where(csim == bsim[:, None], cand, np.iinfo(np.int64).max).min(1), bsim


def _conflict_keys(gpairs, parent, n):
    """Sorted keys lo*n+hi of current cluster pairs that share a photo."""
    r = parent[gpairs]
    r = r[r[:, 0] != r[:, 1]]
    return np.unique(r.min(1) * n + r.max(1))


def _allowed_sims(owner, other, means, keys, n):
    """Exact average similarity of clusters owner[i], other[i]; -inf for cannot-link or self."""
    out = np.empty(len(owner), np.float32)
    for s in range(0, len(owner), _CHUNK):
        o, t = owner[s:s + _CHUNK], other[s:s + _CHUNK]
        out[s:s + _CHUNK] = np.einsum("ij,ij->i", means[o], means[t])
    bad = owner == other
    if len(keys):
        k = np.minimum(owner, other) * n + np.maximum(owner, other)
        bad |= keys[np.minimum(np.searchsorted(keys, k), len(keys) - 1)] == k
    out[bad] = -np.inf
    return out


def _refresh(active, cand, csim, parent, means, keys, n):
    """Point candidates that were merged away at their new cluster and recompute those sims."""
    rows = cand[active]
    new = parent[rows]
    r, c = np.nonzero(new != rows)
    if len(r):
        owner = active[r]
        cand[owner, c] = new[r, c]
        csim[owner, c] = _allowed_sims(owner, new[r, c], means, keys, n)


def _keep_top(owner, ids, sims, bound_in):
    """Sort rows by similarity (duplicates removed), keep _LIST; dropped ones raise the bound."""
    order = np.argsort(ids, 1, kind="stable")
    ids, sims = np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)
    dup = np.zeros(ids.shape, bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    ids[dup], sims[dup] = np.broadcast_to(owner[:, None], ids.shape)[dup], -np.inf
    order = np.argsort(-sims, 1, kind="stable")
    ids, sims = np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)
    if ids.shape[1] > _LIST:
        bound_in = np.maximum(bound_in, sims[:, _LIST])
    return ids[:, :_LIST], sims[:, :_LIST], bound_in


def _search(need, active, cand, csim, bound, means, keys, ivf, s_min):
    """Fresh candidate lists for `need` by k-NN over the active cluster means."""
    n, k = len(means), _LIST + 1
    while len(need):
        sims, pos = _knn(means, active, need, min(k, len(active)), ivf)
        ids = np.where(pos >= 0, active[np.maximum(pos, 0)], need[:, None])
        full = (pos >= 0).all(1) & (k < len(active))      # unreturned clusters exist
        # only the k-th returned similarity bounds the unreturned ones
        kth = np.where(full, np.where(ids == need[:, None], np.inf, sims).min(1), -np.inf)
        owner = np.repeat(need, ids.shape[1])
        sims = _allowed_sims(owner, ids.ravel(), means, keys, n).reshape(ids.shape)
        cand[need], csim[need], bound[need] = _keep_top(need, ids, sims, kth.astype(np.float32))
        # rare: all k results forbidden (cannot-link) but an unreturned one may qualify
        need = need[(csim[need, 0] < bound[need]) & (bound[need] >= s_min)]
        k *= 4


def _knn(means, base, query, k, ivf):
    """Top-k inner products of means[query] against means[base]: (sims, positions in base)."""
    if ivf is None or float(len(query)) * len(base) <= _FLAT_PAIRS:
        heap = faiss.ResultHeap(len(query), k, keep_max=True)
        q = means[query]
        for s in range(0, len(base), _CHUNK):
            d, i = faiss.knn(q, means[base[s:s + _CHUNK]], k, faiss.METRIC_INNER_PRODUCT)
            heap.add_result(d, np.where(i >= 0, i + s, -1))
        heap.finalize()
        return heap.D, heap.I
    return ivf.search(means, base, query, k)


def _merge(a, b, means, size, parent, cand, csim, bound, gpairs, ivf):
    """Merge clusters b[i] into a[i]; returns the new cannot-link keys."""
    n = len(means)
    if ivf is not None:                   # the merged cluster probes where the bigger part did
        ivf.probes[a] = ivf.probes[np.where(size[a] >= size[b], a, b)]
    for s in range(0, len(a), _CHUNK):
        i, j = a[s:s + _CHUNK], b[s:s + _CHUNK]
        w = (size[i] / (size[i] + size[j]))[:, None]
        means[i] = w * means[i] + (1 - w) * means[j]
    size[a] += size[b]
    parent[b] = a
    parent[:] = parent[parent]            # previous rounds left depth <= 1, so this compresses
    keys = _conflict_keys(gpairs, parent, n)
    for s in range(0, len(a), _CHUNK // _LIST):
        i, j = a[s:s + _CHUNK // _LIST], b[s:s + _CHUNK // _LIST]
        ids = parent[np.hstack([cand[i], cand[j]])]       # union of both candidate lists
        owner = np.repeat(i, ids.shape[1])
        sims = _allowed_sims(owner, ids.ravel(), means, keys, n).reshape(ids.shape)
        cand[i], csim[i], bound[i] = _keep_top(i, ids, sims, np.maximum(bound[i], bound[j]))
    return keys


class _IVF:
    """Inverted-file index over cluster means. The coarse assignment is computed once for the
    faces and inherited on merges, so each search only re-encodes the active means."""

    def __init__(self, emb):
        n, dim = emb.shape
        nlist = int(np.clip(4 * np.sqrt(n), 16, 4096))
        rng = np.random.default_rng(0)
        sample = emb[np.sort(rng.choice(n, min(n, 16 * nlist), replace=False))]
        km = faiss.Kmeans(dim, nlist, niter=8, spherical=True, seed=1, min_points_per_centroid=1)
        km.train(sample)
        self.quantizer = faiss.IndexFlatIP(dim)
        self.quantizer.add(km.centroids)
        self.index = faiss.IndexIVFScalarQuantizer(
            self.quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
            faiss.METRIC_INNER_PRODUCT, False)
        self.index.train(sample[:1])      # fp16 needs no statistics; quantizer is trained
        self.index.nprobe = _NPROBE
        self.probes = np.vstack([self.quantizer.search(emb[s:s + _CHUNK], _NPROBE)[1]
                                 for s in range(0, n, _CHUNK)])

    def search(self, means, base, query, k):
        self.index.reset()
        for s in range(0, len(base), _CHUNK):
            x, home = means[base[s:s + _CHUNK]], np.ascontiguousarray(self.probes[base[s:s + _CHUNK], 0])
            self.index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(home))
        out = [self.index.search_preassigned(
            means[query[s:s + _CHUNK]], k, self.probes[query[s:s + _CHUNK]],
            np.zeros((len(query[s:s + _CHUNK]), _NPROBE), np.float32))
            for s in range(0, len(query), _CHUNK)]
        return np.vstack([d for d, _ in out]), np.vstack([i for _, i in out])
