#!/usr/bin/env python3
"""How well faces become people, with a pack's defaults, on real and synthetic faces.

Sets: labeled/ + groups/ (the labeled face of each photo scored; bystanders clustered too,
as in real use), calib/ (159 people incl. a family and twins, 400 one-photo strangers; the
face nearest the centre of each photo scored) and synthetic faces with real-photo-like
distances (bench/synthetic.py). For each: pairwise P/R/F and BCubed F of the defaults, of
stage 1 alone, of the old fixed threshold; with --sweep, each identity parameter swept with
the others at their defaults; and the distances behind the outlier defaults. Caches are
embedded once into --cache-dir. Last line: one JSON object with every figure.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]
import sort_faces  # noqa: E402
import synthetic  # noqa: E402
from conftest import DATA, calib_truth, labeled_truth, scores  # noqa: E402

SWEEPS = {"pair": [0.50, 0.55, 0.58, 0.60, 0.62, 0.65, 0.70],
          "merge": [0.35, 0.40, 0.45, 0.50, 0.55],
          "join": [0.65, 0.70, 0.72, 0.76, 0.78, 0.80, 0.85],
          "margin": [0.0, 0.04, 0.08, 0.10, 0.12, 0.16, 0.20]}


def embedded(cache_dir, name, folders, pack):
    path = os.path.join(cache_dir, f"{name}-{pack}.npz")
    for folder in folders:
        if sort_faces.main(["embed", os.path.join(DATA, folder), path, "-q", "--pack", pack,
                            "--log-dir", os.path.join(cache_dir, "logs")]):
            sys.exit(f"embed of {folder} failed")
    return sort_faces.load_cache(path)


def score(emb, groups, idx, true, rule, method="auto"):
    labels = sort_faces.identities(emb, groups, rule, method)
    return {k: round(v, 4) for k, v in scores(true, labels[idx]).items()}


def centroid_distances(emb, idx, true, min_faces=4):
    """Per person with >= min_faces scored faces: own faces' distances to the centroid,
    and every other scored face's distance to the nearest such centroid."""
    true = np.asarray(true)
    names = [n for n in set(true.tolist()) if (true == n).sum() >= min_faces]
    cents = np.stack([sort_faces.centroid(emb[idx[true == n]]) for n in names])
    own = np.concatenate([1 - emb[idx[true == n]] @ cents[i] for i, n in enumerate(names)])
    sims = emb[idx] @ cents.T
    mine = np.array([names.index(t) if t in names else -1 for t in true.tolist()])
    sims[np.arange(len(idx))[mine >= 0], mine[mine >= 0]] = -1
    other = 1 - sims.max(1)
    per_person = [1 - emb[idx[true == n]] @ cents[i] for i, n in enumerate(names)]
    keep = {t: min(float(np.mean(d <= t)) for d in per_person) for t in (0.45, 0.50, 0.55, 0.60)}
    return {"own_p50_p99_max": np.percentile(own, [50, 99, 100]).round(3).tolist(),
            "other_min_p1": np.percentile(other, [0, 1]).round(3).tolist(),
            "worst_person_kept_at": {str(t): round(v, 3) for t, v in keep.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--pack", default="default", help="model pack to embed and score with")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "work", "cache", "bench"),
                    help="where the embedded caches are kept between runs")
    ap.add_argument("--synthetic", type=int, default=20000,
                    help="synthetic faces (0: none)")
    ap.add_argument("--crowd", type=int, default=300,
                    help="faces of a crowded sub-population (children's faces, "
                         "synthetic.CROWDS['era']) added to the synthetic set and scored "
                         "apart (0: none)")
    ap.add_argument("--crowd-kind", choices=sorted(synthetic.CROWDS), default="era",
                    help="crowd model (bench/synthetic.py CROWDS)")
    ap.add_argument("--sweep", action="store_true", help="sweep each identity parameter")
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds end to end: 3 people of labeled/ and of calib/, "
                         "1000 synthetic faces, every run and one sweep value, caches in a "
                         "temp folder (checks the bench still works; its figures mean nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="cluster_accuracy-")
        try:
            args.cache_dir, args.synthetic, args.sweep, args.crowd = tmp, 1000, True, 100
            return run(args, SMOKE_FOLDERS, {k: v[:1] for k, v in SWEEPS.items()})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return run(args, FOLDERS, SWEEPS)


FOLDERS = {"labeled": ["labeled", "groups"], "calib": ["calib"]}
SMOKE_FOLDERS = {"labeled": ["labeled/Cesar_Gaviria", "labeled/Shimon_Peres", "labeled/Li_Peng"],
                 "calib": ["calib/Al_Gore", "calib/Yoko_Ono", "calib/Zhu_Rongji"]}


def run(args, folders, sweeps):
    os.makedirs(args.cache_dir, exist_ok=True)
    sets = {}
    lab = embedded(args.cache_dir, "labeled", folders["labeled"], args.pack)
    cal = embedded(args.cache_dir, "calib", folders["calib"], args.pack)
    rule = sort_faces.identity_rule(lab)
    for name, cache, truth in (("labeled+groups", lab, labeled_truth(lab)),
                               ("calib", cal, calib_truth(cal))):
        idx = np.array(sorted(truth))
        sets[name] = (cache.face_emb, cache.face_file, idx, [truth[i] for i in idx])
    if args.synthetic:
        emb, truth, groups = synthetic.make(args.synthetic)
        sets[f"synthetic {args.synthetic}"] = (emb, groups, np.arange(len(emb)), truth.tolist())
        print("synthetic percentiles", synthetic.percentiles(emb, truth))
        if args.crowd:
            emb, truth, groups, crowd = synthetic.make_crowded(args.synthetic, args.crowd, 0,
                                                               args.crowd_kind)
            print("crowd percentiles    ", synthetic.percentiles(emb[crowd], truth[crowd]))
            for part, mask in (("crowd", crowd), ("rest", ~crowd)):
                sets[f"synthetic {args.synthetic} + {args.crowd} crowded: {part}"] = (
                    emb, groups, np.flatnonzero(mask), truth[mask].tolist())
        print("calib percentiles    ", synthetic.percentiles(cal.face_emb[sets["calib"][2]],
                                                            np.array(sets["calib"][3])))
    out = {"pack": args.pack, "rule": dataclasses.asdict(rule), "sets": {}}
    print(f"rule {rule}")
    print(f"{'set':22s} {'run':34s} {'pairP':>6s} {'pairR':>6s} {'pairF':>6s} {'bcubF':>6s}")
    for name, (emb, groups, idx, true) in sets.items():
        rows = {"defaults": score(emb, groups, idx, true, rule),
                "defaults, graph path": score(emb, groups, idx, true, rule, "graph"),
                f"stage 1 alone at {rule.pair}": score(
                    emb, groups, idx, true, dataclasses.replace(rule, merge=0, join=0)),
                "average linkage at 0.80 (old)": {k: round(v, 4) for k, v in scores(
                    true, sort_faces.agglomerate(emb, 0.80, groups)[idx]).items()}}
        if args.sweep:
            for field, values in sweeps.items():
                for v in values:
                    rows[f"{field}={v}"] = score(emb, groups, idx, true,
                                                 dataclasses.replace(rule, **{field: v}))
        for run, s in rows.items():
            print(f"{name:22s} {run:34s} {s['pairwise_p']:6.4f} {s['pairwise_r']:6.4f} "
                  f"{s['pairwise_f']:6.4f} {s['bcubed_f']:6.4f}")
        dist = centroid_distances(emb, idx, true)
        print(f"{name:22s} centroid distances {dist}")
        out["sets"][name] = {"runs": rows, "centroid_distances": dist}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
