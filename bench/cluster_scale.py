"""Scale benchmark for sort_faces.agglomerate on synthetic ArcFace-like embeddings.

Prints progress to stderr and, as its last stdout line, one JSON object with the results.
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sort_faces import agglomerate  # noqa: E402

DIM = 512


def identity_sizes(n, rng):
    """~15% singletons; the rest Zipf-distributed (many with a handful, a few with thousands)."""
    n_single = int(0.15 * n)
    cap = max(20, n // 50)
    sizes = []
    left = n - n_single
    while left > 0:
        s = np.minimum(rng.zipf(2.0, 4096) + 1, cap)
        s = s[np.cumsum(s) <= left] if s.sum() > left else s
        if not len(s):
            s = np.array([left])
        sizes.append(s)
        left -= int(s.sum())
    return np.concatenate([np.ones(n_single, np.int64)] + sizes)


def make_faces(n, seed):
    """Returns (emb float32 (n, DIM) unit rows, identity per face, photo group per face)."""
    rng = np.random.default_rng(seed)
    sizes = identity_sizes(n, rng)
    truth = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.standard_normal((len(sizes), DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # member = a*centre + b*noise with per-face quality a; cos(i, j) ~ a_i*a_j ~ 0.5-0.7,
    # plus 10% poor faces (blur, profile) that sit near the threshold
    a2 = np.where(rng.random(n) < 0.9, rng.normal(0.62, 0.06, n), rng.uniform(0.3, 0.55, n))
    a = np.sqrt(np.clip(a2, 0.3, 0.9)).astype(np.float32)
    b = np.sqrt(1 - a * a)
    emb = np.empty((n, DIM), np.float32)
    for s in range(0, n, 65536):
        sl = slice(s, s + 65536)
        noise = rng.standard_normal((len(a[sl]), DIM), dtype=np.float32) / np.sqrt(DIM)
        x = a[sl, None] * centres[truth[sl]] + b[sl, None] * noise
        emb[sl] = x / np.linalg.norm(x, axis=1, keepdims=True)
    # ~25% of faces share a photo with 1-3 others; a person appears at most once per photo
    groups = np.full(n, -1, np.int64)
    multi = rng.permutation(n)[: n // 4]
    photo = np.repeat(np.arange(len(multi)), rng.integers(2, 5, len(multi)))[: len(multi)]
    groups[multi] = photo
    _, first = np.unique(photo * len(sizes) + truth[multi], return_index=True)
    dup = np.ones(len(multi), bool)
    dup[first] = False
    groups[multi[dup]] = -1
    return emb, truth, groups


def timed(emb, args, groups, method):
    """labels, wall seconds, CPU seconds (all threads; tells whether other load slowed us)"""
    t, cpu = time.perf_counter(), time.process_time()
    labels = agglomerate(emb, args.threshold, groups, method)
    return labels, round(time.perf_counter() - t, 2), round(time.process_time() - cpu, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--faces", type=int, required=True, help="number of synthetic faces")
    p.add_argument("--threshold", type=float, default=0.55,
                   help="cosine-distance merge threshold (average linkage)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the synthetic data")
    p.add_argument("--method", choices=["auto", "exact", "graph"], default="auto",
                   help="clustering method passed to agglomerate()")
    p.add_argument("--agree", action="store_true",
                   help="also run both exact and graph and report their adjusted Rand index "
                        "(exact needs an N×N matrix: only for N <= 20000)")
    args = p.parse_args()

    t = time.perf_counter()
    emb, truth, groups = make_faces(args.faces, args.seed)
    gen_s = time.perf_counter() - t
    print(f"generated {args.faces} faces, {truth.max() + 1} identities in {gen_s:.1f}s",
          file=sys.stderr)
    labels, secs, cpu = timed(emb, args, groups, args.method)
    out = dict(faces=args.faces, threshold=args.threshold, method=args.method,
               seconds=secs, cpu_seconds=cpu,
               clusters=int(labels.max() + 1),
               identities=int(truth.max() + 1),
               ari_vs_truth=round(adjusted_rand_score(truth, labels), 5),
               generate_seconds=round(gen_s, 2))
    if args.agree:
        exact, out["seconds_exact"], _ = timed(emb, args, groups, "exact")
        graph, out["seconds_graph"], _ = timed(emb, args, groups, "graph")
        out["ari_exact_vs_graph"] = round(adjusted_rand_score(exact, graph), 5)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["load_avg_1m"] = round(os.getloadavg()[0], 1)   # > cores: timings include contention
    print(json.dumps(out))


if __name__ == "__main__":
    main()
