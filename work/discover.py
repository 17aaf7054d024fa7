#!/usr/bin/env python3
"""New people in a mixed folder, added to an export-swap output.

Faces under --source (byte-identical aliases included) that are not already one of the
facesets in SWAP_OUT (within --existing-threshold of a faceset's mean embedding) are
clustered; refine's gates apply (face size, blur, detector score, outlier rejection for
clusters of >= 4), and clusters with at least --min-faces unique photos become new facesets,
numbered after the highest faceset_NNN there and exported like `export-swap`, each with a
<name>.txt provenance marker. Nothing already in SWAP_OUT changes.

  python sort_faces.py embed ~/Pictures/party work/cache/photos.npz
  python sort_faces.py enrich work/cache/photos.npz
  python work/discover.py --cache work/cache/photos.npz --out facesets_swap_ready \\
      --source ~/Pictures/party --dry-run
"""
import argparse
import datetime
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sort_faces as sf  # noqa: E402


def candidates(cache, faces, cents, threshold):
    """Faces farther than threshold from every existing faceset's centroid."""
    if not len(cents) or not len(faces):
        return np.asarray(faces, np.int64)
    d = 1.0 - cache.face_emb[faces] @ cents.T
    return np.asarray(faces, np.int64)[d.min(axis=1) > threshold]


def new_facesets(cache, faces, args):
    """refine's plan on these faces: (facesets, per-cluster reports)."""
    rule = sf.identity_rule(cache, args.cluster_threshold, args.merge_threshold,
                            args.join_threshold, args.join_margin)
    outlier = sf.pack_threshold(cache, "outlier", args.outlier_threshold_refine)
    plan = sf.plan_refine(cache, faces, rule, outlier, sf.Gates.from_args(args),
                          args.min_faces)
    return plan.facesets, plan.reports


def run(args):
    cache = sf.load_cache(args.cache)
    for folder in args.source:
        if not os.path.isdir(folder):
            raise sf.SortFacesError(f"--source folder not found: {folder}")
    swap = sf.SwapOut(args.out, cache, clean=args.clean, dry_run=args.dry_run)
    try:
        return discover(cache, swap, args)
    finally:
        swap.dir.close()


def discover(cache, swap, args):
    faces = sf.faces_under(cache, args.source)
    cents = swap.centroids()
    left = candidates(cache, faces, cents,
                      sf.pack_threshold(cache, "outlier", args.existing_threshold))
    sf.CONSOLE.info(f"{len(faces)} faces under --source, {len(faces) - len(left)} belong to "
                    f"the {len(cents)} facesets already in {swap.path}, {len(left)} left")
    sets, reports = new_facesets(cache, left, args)
    for k, (size, kept, dropped) in enumerate(reports, 1):
        if size >= 2:
            gates = sf.count_gates(dropped)
            sf.CONSOLE.info(f"cluster {k}: {size} faces -> {kept} kept; removed "
                            f"{sf.describe_counts(gates) if gates else 'nothing'}")
    if args.dry_run or not sets:
        sf.log_result(f"discover: {len(sets)} new facesets {swap.next_names(len(sets))} "
                      f"(sizes {[len(s) for s in sets]})"
                      + (" [dry run: nothing written]" if args.dry_run else ""))
        return 0
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    extra = {"source_dirs": [os.path.abspath(s) for s in args.source], "at": stamp}
    opts = sf.ExportOptions.from_args(args)
    names = []
    for members in sets:
        entry = sf.export_marked(cache, swap, swap.next_names(1)[0], members, opts,
                                 source="discover", key=None, extra=extra,
                                 note=f"discovered by work/discover.py at {stamp}\n"
                                      f"in: {', '.join(extra['source_dirs'])}\n"
                                      f"faces: {len(members)}")
        if entry:
            names.append(entry["name"])
    swap.finish()
    sf.log_result(f"discover: {len(names)} new facesets {names} (sizes "
                  f"{[len(s) for s in sets]}); wrote {swap.path}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=sf.HelpFormatter)
    sf.add_workflow_args(p)
    p.add_argument("--source", nargs="+", required=True, metavar="DIR",
                   help="mixed folders to look for new people in")
    g = p.add_argument_group("identity (README: How faces become people)")
    g.add_argument("--existing-threshold", type=float, default=None, metavar="DIST",
                   help="a face this close to an existing faceset's centroid belongs to it; "
                        "unset: " + sf.pack_defaults_help("outlier"))
    sf.add_identity_args(g, "--cluster-threshold")
    g.add_argument("--outlier-threshold-refine", type=float, default=None, metavar="DIST",
                   help="refine's outlier rejection; unset: " + sf.pack_defaults_help("outlier"))
    g.add_argument("--min-faces", type=int, default=6, metavar="N",
                   help="unique photos a new faceset needs")
    sf.add_gate_args(p)
    sf.add_model_dir_arg(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the candidate clusters and what each gate removed; write nothing")
    sf.add_swap_args(p)
    sf.add_common_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return sf.run_step("discover", run, args)


if __name__ == "__main__":
    raise SystemExit(main())
