#!/usr/bin/env python3
"""The whole `cluster` command on a large synthetic library, against the reference kNN graph.

Faces come from bench/synthetic.py (real-photo-like distances; their percentiles are
printed next to calib/'s). They are written as a real cache (plus thumbnail store, and
with --photos one small real JPEG per photo) and `sort_faces.py cluster` runs on it as a
user would run it, in a child process; its `phases:` log line gives load / plan / write /
thumbnails / page, and its peak memory is the child's. The reference (faiss IVFFlat,
nlist 4 sqrt(N), 40 nlist training faces, nprobe 8, k = 16 for every face; the least a
kNN-based clustering must do) runs in this process on the same faces, before and after.
Last line: one JSON object.

  python bench/cluster_scale.py --faces 300000 --dry-run
  python bench/cluster_scale.py --faces 50000 --photos --link hardlink
"""
import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
import sort_faces  # noqa: E402
import synthetic  # noqa: E402


def tiny_jpeg(seed):
    """A real 112 px JPEG (a thumbnail / a small photo)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(128, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
    import cv2
    return sort_faces.encode_image(cv2.resize(img, (112, 112)))


def write_cache(path, emb, groups, photos_dir=None, thumbs=True):
    """A consolidated cache of these faces (one photo per group, one per ungrouped face)
    and its thumbnail store; with photos_dir, the photos exist as small real files."""
    n = len(emb)
    photo = groups.copy()
    alone = photo < 0
    photo[alone] = photo.max() + 1 + np.arange(alone.sum())
    photo = np.unique(photo, return_inverse=True)[1].ravel()
    n_files = int(photo.max()) + 1
    base = tiny_jpeg(0)
    paths, shas, sizes, mtimes = [], [], np.zeros(n_files, np.int64), np.zeros(n_files, np.int64)
    root = photos_dir or os.path.join(os.path.dirname(path), "photos")
    for f in range(n_files):
        p = os.path.join(root, f"{f // 1000:04d}", f"{f:07d}.jpg")
        data = base + f.to_bytes(4, "little")          # trailing bytes: unique content
        if photos_dir:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as fh:
                fh.write(data)
            st = os.stat(p)
            sizes[f], mtimes[f] = st.st_size, st.st_mtime_ns
        paths.append(p)
        shas.append(hashlib.sha256(data).hexdigest())
    order = np.argsort(photo, kind="stable")
    cols = {"file_path": np.array(paths), "file_sha256": np.array(shas),
            "file_size": sizes, "file_mtime_ns": mtimes,
            "file_status": np.full(n_files, "ok"), "file_error": np.full(n_files, ""),
            "file_width": np.full(n_files, 640, np.int32),
            "file_height": np.full(n_files, 480, np.int32),
            "file_n_faces": np.bincount(photo, minlength=n_files).astype(np.int32),
            "file_phash": np.arange(n_files, dtype=np.int64) * 7919,
            "file_phash_flip": np.arange(n_files, dtype=np.int64) * 104729,
            "file_enrich_error": np.full(n_files, "")}
    slot = np.zeros(n, np.int64)                  # a face's position in its photo: its box
    sp = photo[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sp)) + 1]
    slot[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    bbox = np.stack([20 + 130 * slot, np.full(n, 40), 140 + 130 * slot, np.full(n, 160)],
                    1).astype(np.float32)
    cols.update({"face_emb": emb[order], "face_file": photo[order], "face_bbox": bbox[order],
                 "face_kps": np.zeros((n, 5, 2), np.float32),
                 "face_det_score": np.full(n, 0.9, np.float32),
                 "face_short": np.full(n, 120, np.float32),
                 "face_blur": np.full(n, 300, np.float32)})
    for k, (dtype, shape) in sort_faces.FACE_COLS.items():
        cols.setdefault(f"face_{k}", np.zeros((n,) + shape, dtype))
    pack = sort_faces.locate_pack("default")
    meta = {"format": sort_faces.CACHE_FORMAT, "tool_version": sort_faces.__version__,
            "pack": pack.identity(), "roots": [root]}
    sort_faces._write_npz(path, meta, cols)
    if not thumbs:                                # a dry run shows no page
        return n_files
    store = sort_faces.ThumbStore(path)
    thumb = tiny_jpeg(1)
    for f0 in range(0, n, 100_000):               # batches as embed would write them
        sl = slice(f0, f0 + 100_000)
        fs = cols["face_file"][sl]
        store._new = ([shas[f].encode() for f in fs.tolist()], list(cols["face_bbox"][sl]),
                      [thumb] * len(fs))
        store.flush()
    return n_files


def run_cluster(cache, out, extra, log_dir):
    cmd = [sys.executable, os.path.join(ROOT, "sort_faces.py"), "cluster", cache, out, "-q",
           "--log-dir", log_dir, *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"cluster failed: {r.stderr[-2000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    logs = sorted(os.path.join(log_dir, f) for f in os.listdir(log_dir))
    text = open(logs[-1]).read()
    phases = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([\d.]+) s", text.split(
        "phases: ")[-1].splitlines()[0]))
    return wall, phases, max(rss, before) / 1024 / 1024, r.stdout.strip()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, help="synthetic faces (required unless --smoke)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    ap.add_argument("--isotropic", action="store_true",
                    help="the old generator: identity centres uniform on the sphere")
    ap.add_argument("--dry-run", action="store_true", help="cluster --dry-run (plan only)")
    ap.add_argument("--photos", action="store_true",
                    help="write one small real JPEG per photo, so cluster links/copies them")
    ap.add_argument("--link", default="hardlink", help="cluster --link (default hardlink)")
    ap.add_argument("--repeat", type=int, default=1, help="runs; medians are reported")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference kNN graph (it takes ~13 min at 1M faces)")
    ap.add_argument("--calib-cache", default=os.path.join(ROOT, "work", "cache", "bench",
                                                          "calib-default.npz"),
                    help="calib/ cache for the percentile check (skipped when missing)")
    ap.add_argument("--tmp", default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds end to end: 2000 faces with photos, one run, one "
                         "reference (checks the bench still works; its figures mean nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.faces, args.photos, args.repeat = 2000, True, 1
    elif not args.faces:
        ap.error("--faces is required")
    tmp = tempfile.mkdtemp(dir=args.tmp)
    try:
        t = time.perf_counter()
        emb, truth, groups = synthetic.make(args.faces, args.seed, args.isotropic)
        print(f"generated {args.faces} faces, {truth.max() + 1} identities in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
        pct = synthetic.percentiles(emb, truth)
        print("synthetic percentiles", pct, file=sys.stderr)
        if os.path.exists(args.calib_cache):
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from conftest import calib_truth
            cal = sort_faces.load_cache(args.calib_cache)
            truth_c = calib_truth(cal)
            idx = np.array(sorted(truth_c))
            print("calib percentiles    ", synthetic.percentiles(
                cal.face_emb[idx], np.array([truth_c[i] for i in idx])), file=sys.stderr)
        cache = os.path.join(tmp, "faces.npz")
        n_files = write_cache(cache, emb, groups,
                              os.path.join(tmp, "photos") if args.photos else None,
                              thumbs=not args.dry_run)
        del emb
        extra = ["--dry-run"] if args.dry_run else ["--link", args.link]
        runs = []
        for r in range(args.repeat):
            out = os.path.join(tmp, f"out{r}")
            wall, phases, rss, line = run_cluster(cache, out, extra, os.path.join(tmp, "logs"))
            refs = [synthetic.reference_knn(sort_faces.load_cache(cache).face_emb)
                    for _ in range(0 if args.no_reference else
                                   1 if args.faces > 300_000 or args.smoke else 2)]
            ref = min(refs) if refs else float("nan")
            runs.append(dict(wall=wall, reference=ref, ratio=wall / ref, rss_gb=rss, **phases))
            print(f"run {r + 1}: cluster {wall:.1f} s, reference {ref:.1f} s "
                  f"({wall / ref:.2f}x), peak {rss:.2f} GB; {phases}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
        med = {k: round(float(np.median([r[k] for r in runs])), 2) for k in runs[0]}
        print(json.dumps({"faces": args.faces, "photos": n_files, "dry_run": args.dry_run,
                          "percentiles": pct, "median": med, "runs": len(runs),
                          "summary": line, "load_avg_1m": round(os.getloadavg()[0], 1)}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
