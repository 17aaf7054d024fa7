#!/usr/bin/env python3
"""Split one person's faceset into eras (the same person at 20 and at 40).

Seeds from the faceset's mean embedding in SWAP_OUT, recovers more faces of the person from
the cache under the faceset's source folders, applies refine's quality gates, re-centres
once, and sub-clusters (average linkage). Sub-clusters of >= --anchor-min faces are anchors;
a smaller fragment joins the single nearest anchor only if their centroids are within
--join-threshold AND its dominant photo year is within --year-window of the anchor's (no
transitive merging: it makes eras drift); the rest stay on their own. Eras are exported
like `export-swap` as <faceset>_<years>/ with an <era>.txt marker; eras with fewer than
--anchor-min faces go to SWAP_OUT/_thin/ (listed as `thin_eras` in the manifest).
Eras follow photo years, so the split is refused (one line, nothing written) unless at least
half of the person's faces, and at least --anchor-min, come from photos with a year.

Photo year: EXIF DateTimeOriginal, then DateTime, else unknown (the file's mtime only with
--use-mtime), cached in work/cache/exif_years.json by path + size + mtime.

  python work/age_split.py --cache work/cache/photos.npz --out facesets_swap_ready \\
      --faceset faceset_003 --probe
"""
import argparse
import datetime
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sort_faces as sf  # noqa: E402

EXIF_CACHE = os.path.join(sf.ROOT_DIR, "work", "cache", "exif_years.json")


# ----------------------------------------------------------------------------- years
class YearReader:
    """Photo years from EXIF, remembered by path + size + mtime (`reads` counts EXIF reads)."""

    def __init__(self, path=EXIF_CACHE, use_mtime=False):
        self.path, self.use_mtime, self.reads = path, use_mtime, 0
        try:
            self.known = sf.read_json(path, "EXIF year cache") if os.path.lexists(path) else {}
        except sf.SortFacesError:
            self.known = {}

    def year(self, path):
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = f"{st.st_size}:{st.st_mtime_ns}"
        hit = self.known.get(path)
        if hit is None or hit.get("key") != key:
            hit = {"key": key, "year": exif_year(path)}
            self.reads += 1
            self.known[path] = hit
        if hit["year"] is None and self.use_mtime:
            return datetime.datetime.fromtimestamp(st.st_mtime).year
        return hit["year"]

    def save(self):
        sf.write_json_atomic(self.path, self.known)


def exif_year(path):
    """Year of EXIF DateTimeOriginal, else DateTime, else None."""
    from PIL import Image
    try:
        with sf.open_regular(path) as f, Image.open(f) as im:
            exif = im.getexif()
            stamp = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
    except Exception:
        return None
    try:
        year = int(str(stamp).strip()[:4])
    except (TypeError, ValueError):
        return None
    return year if 1826 <= year <= 2200 else None


def dominant_year(years):
    known = [y for y in years if y is not None]
    return Counter(known).most_common(1)[0][0] if known else None


# ----------------------------------------------------------------------------- eras
def assign_eras(emb, years, labels, anchor_min, join, window):
    """Sub-clusters -> eras. Anchors (>= anchor_min faces) stay as they are; a fragment
    joins the nearest anchor if its centroid is within `join` and its dominant year within
    `window` years of the anchor's, judged against the anchor as it was (never the grown
    era: no transitive drift). Returns [(member positions, 'anchor' | 'fragment')]."""
    groups = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    anchors = [g for g in groups if len(g) >= anchor_min]
    eras = [(list(g), "anchor") for g in anchors]
    if anchors:
        cents = np.stack([sf.centroid(emb[g]) for g in anchors])
        anchor_years = [dominant_year([years[i] for i in g]) for g in anchors]
    for g in groups:
        if len(g) >= anchor_min:
            continue
        if anchors:
            d = 1.0 - cents @ sf.centroid(emb[g])
            a = int(d.argmin())
            fy, ay = dominant_year([years[i] for i in g]), anchor_years[a]
            if d[a] <= join and fy is not None and ay is not None and abs(fy - ay) <= window:
                eras[a][0].extend(g.tolist())
                continue
        eras.append((list(g), "fragment"))
    return eras


def era_name(faceset, years, taken):
    known = sorted(y for y in years if y is not None)
    base = f"{faceset}_{known[0]}-{known[-1]}" if known else f"{faceset}_unknown"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


# ----------------------------------------------------------------------------- steps
def split_thresholds(cache, args):
    """recover, recentre, subcluster, join (cosine distances) from the pack's table
    (sort_faces.PACK_THRESHOLDS: outlier, export_outlier, era, merge) or the flags."""
    given = (("recover", "outlier", "recover_threshold"),
             ("recentre", "export_outlier", "recentre_threshold"),
             ("subcluster", "era", "subcluster_threshold"), ("join", "merge", "join_threshold"))
    return {k: sf.pack_threshold(cache, key, getattr(args, flag, None))
            for k, key, flag in given}


def person_faces(cache, swap, entry, th, args):
    """Seed, recover under the faceset's source folders, gate, re-centre once."""
    seed = swap.centroids()[[e["name"] for e in swap.facesets
                             if e.get("embedding")].index(entry["name"])]
    fm = sf.Result.read(os.path.join(swap.path, entry["path"], sf.RESULT_KINDS["faceset"].file),
                        "faceset", cache, same_cache=False)
    roots = sorted({os.path.dirname(r["path"]) for r in fm.pngs})
    faces = sf.faces_under(cache, roots)
    faces = faces[1.0 - cache.face_emb[faces] @ seed <= th["recover"]]
    faces = sf.quality_gate(cache, faces, sf.Gates.from_args(args), [])
    return np.array(sf.centroid_gate(cache.face_emb, faces, (th["recentre"],)), np.int64), roots


def probe(cache, faces, years, th):
    emb = cache.face_emb[faces]
    d = 1.0 - emb @ sf.centroid(emb)
    hist, edges = np.histogram(d, bins=10, range=(0, 1))
    lines = ["distance to the person's centroid:"]
    lines += [f"  {lo:.1f}-{hi:.1f} {n:5d} {'#' * min(n, 60)}"
              for lo, hi, n in zip(edges, edges[1:], hist) if n]
    thresholds = sorted({0.30, 0.35, 0.40, 0.45, 0.50, th["subcluster"]})
    for t in thresholds:
        labels = sf.agglomerate(emb, t, groups=cache.face_file[faces])
        sizes = sorted(np.bincount(labels).tolist(), reverse=True)
        lines.append(f"sub-clusters at {t:.2f}: {len(sizes)}, sizes {sizes[:12]}")
        if t == th["subcluster"]:
            for k in np.argsort(-np.bincount(labels))[:12]:
                ys = Counter(years[i] for i in np.flatnonzero(labels == k))
                lines.append(f"  sub-cluster of {ys.total()}: years "
                             + ", ".join(f"{y or 'unknown'}: {n}" for y, n in sorted(
                                 ys.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))))
    return "\n".join(lines)


def run(args):
    cache = sf.load_cache(args.cache)
    sf.safe_component(args.faceset, "--faceset")
    swap = sf.SwapOut(args.out, cache, clean=args.clean,
                      dry_run=args.dry_run or args.probe)
    try:
        return split(cache, swap, args)
    finally:
        swap.dir.close()


def split(cache, swap, args):
    entry = next((e for e in swap.facesets if e["name"] == args.faceset), None)
    if entry is None or not entry.get("embedding"):
        raise sf.SortFacesError(f"{args.faceset} is not an exported faceset in {swap.path}")
    th = split_thresholds(cache, args)
    faces, roots = person_faces(cache, swap, entry, th, args)
    reader = YearReader(args.exif_cache, args.use_mtime)
    years = [reader.year(str(cache.file_path[cache.face_file[i]])) for i in faces]
    reader.save()                 # a cache of photo years, outside OUT (also on --probe)
    sf.CONSOLE.info(f"{args.faceset}: {len(faces)} faces under {len(roots)} source folders; "
                    f"{reader.reads} EXIF reads")
    if not len(faces):
        raise sf.SortFacesError(f"no faces of {args.faceset} found under its source folders")
    if args.probe:
        sf.log_result(probe(cache, faces, years, th))
        return 0
    dated = sum(y is not None for y in years)
    if dated < max(len(faces) / 2, args.anchor_min):
        raise sf.SortFacesError(
            f"{args.faceset}: only {dated} of {len(faces)} faces come from photos with a "
            f"year (EXIF date{'' if args.use_mtime else '; --use-mtime adds file times'}): "
            f"eras need at least half of them, and at least --anchor-min "
            f"({args.anchor_min}); nothing written")
    labels = sf.agglomerate(cache.face_emb[faces], th["subcluster"],
                            groups=cache.face_file[faces])
    eras = assign_eras(cache.face_emb[faces], years, labels, args.anchor_min, th["join"],
                       args.year_window)
    taken = set()
    plan = [(era_name(args.faceset, [years[i] for i in members], taken), members, kind)
            for members, kind in sorted(eras, key=lambda e: (-len(e[0]), e[0][0]))]
    for name, members, kind in plan:
        where = "" if len(members) >= args.anchor_min else " -> _thin/"
        sf.CONSOLE.info(f"{name}: {len(members)} faces ({kind}){where}")
    if args.dry_run:
        sf.log_result(f"age_split: {len(plan)} eras [dry run: nothing written]")
        return 0
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    opts = sf.ExportOptions.from_args(args)
    full = thin = 0
    for name, members, kind in plan:
        is_thin = len(members) < args.anchor_min
        extra = {"faceset": args.faceset, "at": stamp, "kind": kind, "thin": is_thin,
                 "years": sorted({y for y in (years[i] for i in members) if y is not None})}
        entry = sf.export_marked(
            cache, swap, name, faces[members].tolist(), opts, source="age_split",
            key=[args.faceset, name], extra=extra, folder="_thin/{name}" if is_thin else None,
            note=f"era of {args.faceset}, split by work/age_split.py at {stamp}\n"
                 f"years: {extra['years'] or 'unknown'}\nfaces: {len(members)} ({kind})")
        if entry:
            thin, full = thin + is_thin, full + (not is_thin)
    swap.finish()
    sf.log_result(f"age_split: {args.faceset} -> {len(plan)} eras ({full} full, {thin} thin);"
                  f" wrote {swap.path}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=sf.HelpFormatter)
    sf.add_workflow_args(p)
    p.add_argument("--faceset", required=True, metavar="NAME", help="faceset to split")
    p.add_argument("--probe", action="store_true",
                   help="print distances, sub-cluster sizes and years; nothing is written "
                        "to OUT (photo years are still remembered in --exif-cache, so the "
                        "next run reads no EXIF)")
    g = p.add_argument_group("split (unset thresholds: the pack's, sort_faces.PACK_THRESHOLDS)")
    for flag, key, what in (("--recover-threshold", "outlier", "recover faces this close to "
                             "the seed"), ("--recentre-threshold", "export_outlier",
                                           "keep faces this close after re-centring"),
                            ("--subcluster-threshold", "era", "average-linkage "
                             "sub-clustering"), ("--join-threshold", "merge",
                                                 "fragment-to-anchor centroid distance")):
        g.add_argument(flag, type=float, default=None, metavar="DIST",
                       help=f"{what}; unset: " + sf.pack_defaults_help(key))
    g.add_argument("--anchor-min", type=int, default=20, metavar="N",
                   help="faces that make a sub-cluster an anchor (and an era not thin)")
    g.add_argument("--year-window", type=int, default=5, metavar="YEARS",
                   help="a fragment's dominant year must be this close to its anchor's")
    g.add_argument("--exif-cache", default=EXIF_CACHE, metavar="FILE",
                   help="where photo years are remembered")
    g.add_argument("--use-mtime", action="store_true",
                   help="use the file's mtime year when a photo has no EXIF date")
    sf.add_gate_args(p)
    sf.add_model_dir_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print the eras, write nothing")
    sf.add_swap_args(p)
    sf.add_common_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return sf.run_step("age_split", run, args)


if __name__ == "__main__":
    raise SystemExit(main())
