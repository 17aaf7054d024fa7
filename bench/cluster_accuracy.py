#!/usr/bin/env python3
"""Clustering accuracy on ../shared/data/labeled against the true identities.

Each photo's labeled face (labeled_faces.csv box, matched by IoU) carries its identity;
every distractor is its own identity. All detected faces are clustered (bystanders too, as
in real use) and the labeled faces are scored: pairwise precision/recall/F, BCubed F, NMI.
Last line: one JSON object with every figure.
"""
import argparse
import csv
import json
import os
import sys
import tempfile
from collections import Counter, defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import sort_faces  # noqa: E402

DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data")


def iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def labeled_faces(cache, data=DATA):
    """cache face index -> identity, for the labeled face of every photo found."""
    root = os.path.realpath(os.path.join(data, "labeled"))
    truth = {}
    by_path = {os.path.realpath(p): i for p, i in cache.by_path.items()}
    for row in csv.DictReader(open(os.path.join(data, "labeled_faces.csv"))):
        f = by_path.get(os.path.join(root, row["relpath"]))
        box = [float(v) for v in row["labeled_face_box_x1_y1_x2_y2"].split()]
        if f is None or not box:
            continue
        faces = np.flatnonzero(cache.face_file == f)
        best = max(faces, key=lambda i: iou(cache.face_bbox[i], box), default=None)
        if best is not None and iou(cache.face_bbox[best], box) >= 0.3:
            ident = row["identity"]
            truth[int(best)] = ident if ident != "distractors" else "distractor:" + row["relpath"]
    return truth


def scores(true, pred):
    """Pairwise P/R/F, BCubed P/R/F and NMI of two labelings of the same items."""
    from sklearn.metrics import normalized_mutual_info_score
    true, pred = list(true), list(pred)
    pairs = lambda labels: sum(c * (c - 1) // 2 for c in Counter(labels).values())
    tp = pairs(zip(true, pred))
    p_pairs, t_pairs = pairs(pred), pairs(true)
    pp = tp / p_pairs if p_pairs else 1.0
    pr = tp / t_pairs if t_pairs else 1.0
    joint, tc, pc = Counter(zip(true, pred)), Counter(true), Counter(pred)
    bp = sum(joint[(t, p)] ** 2 / pc[p] for t, p in joint) / len(true)
    br = sum(joint[(t, p)] ** 2 / tc[t] for t, p in joint) / len(true)
    f = lambda a, b: 2 * a * b / (a + b) if a + b else 0.0
    return {"pairwise_p": pp, "pairwise_r": pr, "pairwise_f": f(pp, pr),
            "bcubed_p": bp, "bcubed_r": br, "bcubed_f": f(bp, br),
            "nmi": normalized_mutual_info_score(true, pred)}


def chinese_whispers(emb, threshold, iterations=20, seed=0):
    """Chinese whispers on the graph of pairs closer than threshold (dlib's method)."""
    rng = np.random.default_rng(seed)
    sim = emb @ emb.T
    n = len(emb)
    adj = [np.flatnonzero((sim[i] >= 1 - threshold) & (np.arange(n) != i)) for i in range(n)]
    labels = np.arange(n)
    for _ in range(iterations):
        for i in rng.permutation(n):
            if len(adj[i]):
                w = defaultdict(float)
                for j in adj[i]:
                    w[labels[j]] += sim[i, j]
                labels[i] = max(w, key=w.get)
    return np.unique(labels, return_inverse=True)[1]


def algorithms(emb, groups, threshold):
    from sklearn.cluster import DBSCAN
    return {
        f"average@{threshold} (default)": lambda: sort_faces.agglomerate(emb, threshold, groups),
        f"average@{threshold} no cannot-link": lambda: sort_faces.agglomerate(emb, threshold),
        f"average@{threshold} graph path": lambda: sort_faces.agglomerate(emb, threshold, groups,
                                                                          method="graph"),
        "average@0.55 (seed)": lambda: sort_faces.agglomerate(emb, 0.55, groups),
        "single@0.40 (connected components)": lambda: _single(emb, 0.40),
        "complete@0.70": lambda: _sk(emb, 0.70, "complete"),
        **{f"DBSCAN eps={e} min=2": (lambda e=e: DBSCAN(eps=e, min_samples=2, metric="cosine")
                                     .fit_predict(emb)) for e in (0.45, 0.60, 0.70)},
        **{f"Chinese whispers @{t}": (lambda t=t: chinese_whispers(emb, t))
           for t in (0.50, 0.60, 0.70)},
    }


def _sk(emb, t, linkage):
    from sklearn.cluster import AgglomerativeClustering
    return AgglomerativeClustering(n_clusters=None, metric="cosine", linkage=linkage,
                                   distance_threshold=t).fit_predict(emb)


def _single(emb, t):
    return _sk(emb, t, "single")


def _unique_noise(labels):
    """DBSCAN's -1 (noise) means 'alone': give each its own cluster."""
    labels = np.array(labels).copy()
    noise = labels < 0
    labels[noise] = labels.max() + 1 + np.arange(noise.sum())
    return labels


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cache", help="cache of labeled/ (+ groups/); embedded into a temp "
                                    "cache when not given")
    ap.add_argument("--pack", default="default", help="model pack for the temp cache")
    ap.add_argument("--sweep", default="0.40,0.45,0.50,0.55,0.60,0.65,0.70",
                    help="average-linkage thresholds to sweep")
    ap.add_argument("--with-groups", action="store_true",
                    help="also embed groups/ (more bystanders to confuse the clustering)")
    args = ap.parse_args()
    cache_path = args.cache
    if not cache_path:
        tmp = tempfile.mkdtemp()
        cache_path = os.path.join(tmp, "labeled.npz")
        kw = dict(pack_name=args.pack)
        sort_faces.CONSOLE.quiet = True
        sort_faces.embed_tree(os.path.join(DATA, "labeled"), cache_path, **kw)
        if args.with_groups:
            sort_faces.embed_tree(os.path.join(DATA, "groups"), cache_path, **kw)
    cache = sort_faces.load_cache(cache_path)
    truth = labeled_faces(cache)
    emb, groups = cache.face_emb, cache.face_file
    lab_idx = np.array(sorted(truth))
    true = [truth[i] for i in lab_idx]
    print(f"{cache.n_faces} faces, {len(lab_idx)} labeled faces, "
          f"{len(set(true))} identities, pack {cache.meta['pack']['name']}")
    results = {}
    print(f"{'method':40s} {'pairP':>6s} {'pairR':>6s} {'pairF':>6s} {'bcubF':>6s} {'NMI':>6s}")
    rows = [(f"average@{t:.2f} sweep", lambda t=t: sort_faces.agglomerate(emb, t, groups))
            for t in map(float, args.sweep.split(","))]
    rows += list(algorithms(emb, groups, sort_faces.pack_threshold(cache, "cluster")).items())
    for name, fn in rows:
        labels = _unique_noise(fn())
        s = scores(true, labels[lab_idx])
        results[name] = {k: round(v, 4) for k, v in s.items()}
        print(f"{name:40s} {s['pairwise_p']:6.3f} {s['pairwise_r']:6.3f} "
              f"{s['pairwise_f']:6.3f} {s['bcubed_f']:6.3f} {s['nmi']:6.3f}")
    print(json.dumps({"faces": int(cache.n_faces), "labeled": len(lab_idx),
                      "pack": cache.meta["pack"]["name"], "results": results}))


if __name__ == "__main__":
    main()
