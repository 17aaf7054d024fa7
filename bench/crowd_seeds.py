#!/usr/bin/env python3
"""Faces of a crowded sub-population (children's faces, synthetic.CROWDS) among
real-photo-like ones, over several seeds: the crowd's distance percentiles, and pairwise
P / F of the crowd and of the rest for the default identity rule, for stage 1 alone and
for join 0.65 (the fixed threshold issue 24 measured on real childhood photos). One seed
hides how bad a crowd can go (a person swallowing other children's faces), so report the
mean and the worst seed. Last line: one JSON object with every figure."""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]
import sort_faces  # noqa: E402
import synthetic  # noqa: E402
from conftest import scores  # noqa: E402

#: the default pack's rule (sort_faces.PACK_THRESHOLDS)
RULE = sort_faces.IdentityRule(*(sort_faces.PACK_THRESHOLDS["default"][k]
                                 for k in ("cluster", "merge", "join", "margin")))


def run_rule(rule, seeds, n, crowd, kind="era"):
    rows = []
    for seed in seeds:
        emb, truth, groups, in_crowd = synthetic.make_crowded(n, crowd, seed, kind)
        labels = sort_faces.identities(emb, groups, rule)
        c = scores(truth[in_crowd].tolist(), labels[in_crowd])
        r = scores(truth[~in_crowd].tolist(), labels[~in_crowd])
        rows.append([c["pairwise_p"], c["pairwise_f"], r["pairwise_p"], r["pairwise_f"]])
    a = np.array(rows)
    return {"crowd_p": round(float(a[:, 0].mean()), 4), "crowd_f": round(float(a[:, 1].mean()), 4),
            "worst_crowd_p": round(float(a[:, 0].min()), 4),
            "rest_p": round(float(a[:, 2].mean()), 4), "rest_f": round(float(a[:, 3].mean()), 4),
            "per_seed_crowd_p": a[:, 0].round(4).tolist()}


def crowd_percentiles(emb, truth):
    """The issue's row: same person p5/p50/p95, other people p0.1/p1/p5/p50 (cosine)."""
    iu = np.triu_indices(len(emb), 1)
    d = (1 - emb @ emb.T)[iu]
    same = truth[iu[0]] == truth[iu[1]]
    return {"same_p5_p50_p95": np.percentile(d[same], [5, 50, 95]).round(3).tolist(),
            "other_p01_p1_p5_p50": np.percentile(d[~same], [0.1, 1, 5, 50]).round(3).tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6, help="seeds 0..N-1")
    ap.add_argument("--faces", type=int, default=10000, help="real-photo-like faces")
    ap.add_argument("--crowd", type=int, default=100, help="crowded faces")
    ap.add_argument("--kind", choices=sorted(synthetic.CROWDS), default="era",
                    help="crowd model (bench/synthetic.py CROWDS)")
    ap.add_argument("--smoke", action="store_true",
                    help="2 seeds of 1000 + 60 faces (checks the bench still works)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.faces, args.crowd = 2, 1000, 60
    seeds = list(range(args.seeds))
    emb, truth, _, in_crowd = synthetic.make_crowded(100, max(args.crowd, 300), 0, args.kind)
    out = {"seeds": args.seeds, "faces": args.faces, "crowd": args.crowd, "kind": args.kind,
           "crowd_percentiles": crowd_percentiles(emb[in_crowd], truth[in_crowd]),
           "rule": dataclasses.asdict(RULE), "runs": {}}
    print("crowd distances (seed 0, >= 300 faces):", out["crowd_percentiles"])
    for name, rule in (("defaults", RULE),
                       ("stage 1 alone", dataclasses.replace(RULE, merge=0, join=0)),
                       ("join 0.65", dataclasses.replace(RULE, join=0.65))):
        out["runs"][name] = s = run_rule(rule, seeds, args.faces, args.crowd, args.kind)
        print(f"{name:14s} crowd P/F {s['crowd_p']:.3f}/{s['crowd_f']:.3f} worst P "
              f"{s['worst_crowd_p']:.3f}  rest P/F {s['rest_p']:.4f}/{s['rest_f']:.4f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
