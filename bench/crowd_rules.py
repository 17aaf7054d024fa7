#!/usr/bin/env python3
"""Candidate stage-3 rules for crowded neighbourhoods (issue 24), each measured where the
identity rule must not lose: the synthetic crowd over several seeds (crowd_seeds.py), the
rest of those faces, calib/, labeled/ + groups/ and 20k synthetic faces. A candidate is a
veto on stage 3's joins, applied by wrapping sort_faces.nearest_person (so it sees what
stage 3 sees: the mean embeddings of people and of the small clusters). None of them is
the tool's rule; docs/calibration.md says why. Last line: one JSON object."""
import argparse
import contextlib
import dataclasses
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cluster_accuracy  # noqa: E402  (its sys.path set-up and cached real-photo embeddings)
import crowd_seeds  # noqa: E402
import sort_faces  # noqa: E402
import synthetic  # noqa: E402
from conftest import calib_truth, labeled_truth, scores  # noqa: E402


def _joined(pick, sims):
    """Per query that joins: (query index, person index, similarity)."""
    q = np.flatnonzero(pick >= 0)
    return q, pick[q], sims[q]


def joiners_together(limit):
    """The clusters one person takes in must be within `limit` of the other clusters it
    takes in (average linkage, averaged over those clusters, not weighted by their faces):
    joining both says they are one person too."""
    def veto(people, queries, pick, sims, rule):
        q, p, _ = _joined(pick, sims)
        total = np.zeros((len(people), queries.shape[1]))
        count = np.zeros(len(people))
        np.add.at(total, p, queries[q])
        np.add.at(count, p, 1)
        others = (total[p] - queries[q]) / np.maximum(count[p] - 1, 1)[:, None]
        sim = (queries[q] * others).sum(1)
        return q[(count[p] > 1) & (sim < 1 - limit)]
    return veto


def groups_by_centroid(limit):
    """A cluster of two or more faces joins only within `limit` of the person's centroid
    (its own centroid is less noisy than one face, as stage 2 judges people)."""
    def veto(people, queries, pick, sims, rule):
        q, p, _ = _joined(pick, sims)
        norm = np.linalg.norm(queries[q], axis=1)      # 1: one face (sizes are not seen)
        cen = (queries[q] * people[p]).sum(1) / norm / np.linalg.norm(people[p], axis=1)
        return q[(norm < 1 - 1e-4) & (cen < 1 - limit)]
    return veto


def persons_side(margin):
    """The person's side of the margin: a cluster joins only when it is `margin` nearer to
    the person than the person's nearest other person is."""
    def veto(people, queries, pick, sims, rule):
        q, p, s = _joined(pick, sims)
        if len(people) < 2:
            return q[:0]
        sim = people @ people.T         # unnormalised means: a person need not be its
        np.fill_diagonal(sim, -np.inf)  # own nearest, so leave it out explicitly
        return q[s - sim.max(1)[p] < margin]
    return veto


def non_joiners_compete(margin):
    """The person must be `margin` nearer than every small cluster that joins nobody."""
    def veto(people, queries, pick, sims, rule):
        q, _, s = _joined(pick, sims)
        rest = queries[pick < 0]
        if not len(rest):
            return q[:0]
        best = (queries[q] @ rest.T).max(1)
        return q[s - best < margin]
    return veto


def hubness_corrected(k):
    """CSLS-style: a join's similarity counts above what is usual around the person and
    the cluster (the mean similarity of their k nearest counterparts: small clusters for a
    person, people for a cluster), measured against what is usual in this library (the
    median of those means), so a dense library is not judged stricter than a sparse one."""
    def veto(people, queries, pick, sims, rule):
        q, p, s = _joined(pick, sims)
        cross = queries @ people.T
        kq, kp = min(k, cross.shape[1]), min(k, cross.shape[0])
        r_q = -np.sort(-cross, axis=1)[:, :kq].mean(1)
        r_p = -np.sort(-cross, axis=0)[:kp].mean(0)
        excess = (r_q[q] - np.median(r_q) + r_p[p] - np.median(r_p)) / 2
        return q[s - excess < 1 - rule.join]
    return veto


CANDIDATES = {
    "today": None,
    "joiners together, 0.76": joiners_together(0.76),
    "joiners together, 0.85": joiners_together(0.85),
    "groups by centroid, 0.50": groups_by_centroid(0.50),
    "groups by centroid, 0.55": groups_by_centroid(0.55),
    "person's side margin 0.12": persons_side(0.12),
    "person's side margin 0.06": persons_side(0.06),
    "non-joiners compete, 0.12": non_joiners_compete(0.12),
    "non-joiners compete, 0.06": non_joiners_compete(0.06),
    "hubness corrected, k 10": hubness_corrected(10),
    "hubness corrected, k 3": hubness_corrected(3),
}


@contextlib.contextmanager
def vetoed(veto):
    """sort_faces.nearest_person with `veto`'s joins undone (stage 3 calls it)."""
    base = sort_faces.nearest_person

    def wrapped(person_means, query_means, rule, exact=True):
        pick, sims = base(person_means, query_means, rule, exact)
        if veto is not None and (pick >= 0).any():
            pick = pick.copy()
            pick[veto(person_means, query_means, pick, sims, rule)] = -1
        return pick, sims
    sort_faces.nearest_person = wrapped
    try:
        yield
    finally:
        sort_faces.nearest_person = base


def real_sets(cache_dir, folders):
    out = {}
    for name, truth_of in (("labeled", labeled_truth), ("calib", calib_truth)):
        cache = cluster_accuracy.embedded(cache_dir, name, folders[name], "default")
        truth = truth_of(cache)
        idx = np.array(sorted(truth))
        out[name] = (cache.face_emb, cache.face_file, idx, [truth[i] for i in idx])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6, help="crowd seeds 0..N-1")
    ap.add_argument("--faces", type=int, default=10000, help="real-photo-like faces per seed")
    ap.add_argument("--crowd", type=int, default=100, help="crowded faces per seed")
    ap.add_argument("--kind", choices=sorted(synthetic.CROWDS), default="era",
                    help="crowd model (bench/synthetic.py CROWDS)")
    ap.add_argument("--synthetic", type=int, default=20000, help="synthetic faces (no crowd)")
    ap.add_argument("--cache-dir", default=os.path.join(cluster_accuracy.ROOT, "work", "cache",
                                                        "bench"),
                    help="where calib/ and labeled/ embeddings are kept (cluster_accuracy.py)")
    ap.add_argument("--smoke", action="store_true",
                    help="two candidates, 2 seeds of 1000 + 60 faces, 1000 synthetic, 3 people "
                         "each of labeled/ and calib/ in a temp folder (checks it still works)")
    args = ap.parse_args(argv)
    names, folders = list(CANDIDATES), cluster_accuracy.FOLDERS
    if args.smoke:
        import tempfile
        args.seeds, args.faces, args.crowd, args.synthetic = 2, 1000, 60, 1000
        args.cache_dir = tempfile.mkdtemp(prefix="crowd_rules-")
        names, folders = names[:2], cluster_accuracy.SMOKE_FOLDERS
    try:
        return run(args, names, folders)
    finally:
        if args.smoke:
            import shutil
            shutil.rmtree(args.cache_dir, ignore_errors=True)


def run(args, names, folders):
    rule = crowd_seeds.RULE
    sets = real_sets(args.cache_dir, folders)
    emb, truth, groups = synthetic.make(args.synthetic)
    sets[f"synthetic {args.synthetic}"] = (emb, groups, np.arange(len(emb)), truth.tolist())
    out = {"rule": dataclasses.asdict(rule), "seeds": args.seeds, "kind": args.kind,
           "candidates": {}}
    print(f"{'candidate':28s} {'crowd P/F':>12s} {'worst P':>8s} {'rest P/F':>14s}  "
          + "  ".join(f"{n} P/F" for n in sets))
    for name in names:
        with vetoed(CANDIDATES[name]):
            row = crowd_seeds.run_rule(rule, list(range(args.seeds)), args.faces, args.crowd,
                                       args.kind)
            for set_name, (e, g, idx, true) in sets.items():
                s = scores(true, sort_faces.identities(e, g, rule)[idx])
                row[set_name] = [round(s["pairwise_p"], 4), round(s["pairwise_f"], 4)]
        out["candidates"][name] = row
        print(f"{name:28s} {row['crowd_p']:.3f}/{row['crowd_f']:.3f} {row['worst_crowd_p']:8.3f} "
              f"{row['rest_p']:.4f}/{row['rest_f']:.4f}  "
              + "  ".join(f"{row[n][0]:.4f}/{row[n][1]:.4f}" for n in sets))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
