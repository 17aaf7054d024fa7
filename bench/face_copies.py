#!/usr/bin/env python3
"""How well "one face seen twice" is told apart from "two photos of one person", on
../shared/data/calib: for --people people, --photos single-face photos each, every kind of
copy a library holds (turned 90 degrees either way or 180 by its pixels, mirrored, re-saved
at JPEG q55, half size, a 10 % crop) is embedded the way `embed` does (sideways faces
detected again upright), and each copy is compared with its original by the rule
near_duplicate_faces uses (sort_faces.is_copy: aligned-face hash bits / --hamming +
embedding distance / --face-distance <= 1). Different photos of one person are the pairs that must stay apart.
Prints per kind: copies detected, joined by the rule, distance and bit percentiles; the last
line is one JSON object with every figure.
"""
import argparse
import json
import os
import random
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import sort_faces as sf  # noqa: E402

DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "calib")


def variants(bgr):
    import cv2
    h, w = bgr.shape[:2]
    _, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 55])
    return {"turned_cw": np.rot90(bgr, 3), "turned_ccw": np.rot90(bgr, 1),
            "turned_180": np.rot90(bgr, 2), "mirrored": bgr[:, ::-1],
            "resaved": cv2.imdecode(buf, cv2.IMREAD_COLOR),
            "half": cv2.resize(bgr, (w // 2, h // 2), interpolation=cv2.INTER_AREA),
            "crop": bgr[h // 10:h - h // 10, w // 10:w - w // 10]}


def faces_of(models, bgr):
    bgr = np.ascontiguousarray(bgr)
    return sf.embed_faces(models, sf.Decoded(bgr, bgr.shape[1], bgr.shape[0]))


def compare(f, k, g, j):
    """(embedding distance, hash bits either way round) of face k of f and j of g."""
    d = 1.0 - float(f.emb[k] @ g.emb[j])
    return d, min(sf.hash_bits(f.phash[k], g.phash[j]), sf.hash_bits(f.phash[k], g.phash_flip[j]))


def main(argv=None):
    import cv2
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default=DATA, help="folder of per-person folders")
    ap.add_argument("--people", type=int, default=40, help="people drawn (seed 0)")
    ap.add_argument("--photos", type=int, default=4, help="photos per person")
    ap.add_argument("--hamming", type=float, default=sf.DUP_HAMMING)
    ap.add_argument("--face-distance", type=float, default=sf.DUP_FACE_DISTANCE)
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds: 3 people, 2 photos (its figures mean nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.people, args.photos = 3, 2
    models = sf.load_models(sf.locate_pack("default"))
    people = sorted(d for d in os.listdir(args.data)
                    if os.path.isdir(os.path.join(args.data, d)) and not d.startswith("_"))
    random.seed(0)
    joined = lambda d, b: sf.is_copy(b, d, args.hamming, args.face_distance)
    kinds, apart = {}, []
    for person in random.sample(people, min(args.people, len(people))):
        folder = os.path.join(args.data, person)
        originals = []
        for name in sorted(os.listdir(folder))[:args.photos]:
            bgr = cv2.imread(os.path.join(folder, name), cv2.IMREAD_COLOR)
            f = faces_of(models, bgr) if bgr is not None else None
            if f is None or len(f) != 1:
                continue
            originals.append(f)
            for kind, copy in variants(bgr).items():
                g = faces_of(models, copy)
                row = kinds.setdefault(kind, {"copies": 0, "found": [], })
                row["copies"] += 1
                if len(g):
                    j = int(np.argmax(g.emb @ f.emb[0]))
                    row["found"].append(compare(f, 0, g, j))
        for a in range(len(originals)):
            for b in range(a + 1, len(originals)):
                apart.append(compare(originals[a], 0, originals[b], 0))
    out = {"people": args.people, "photos": args.photos, "hamming": args.hamming,
           "face_distance": args.face_distance, "kinds": {}}
    for kind, row in kinds.items():
        found = np.array(row["found"]).reshape(-1, 2)
        out["kinds"][kind] = {
            "copies": row["copies"], "detected": len(found),
            "joined": int(sum(joined(d, b) for d, b in found)),
            "distance_p50_p95_max": np.percentile(found[:, 0], [50, 95, 100]).round(3).tolist()
            if len(found) else None,
            "bits_p50_p95_max": np.percentile(found[:, 1], [50, 95, 100]).tolist()
            if len(found) else None}
        k = out["kinds"][kind]
        print(f"{kind:11s} {k['detected']:4d}/{k['copies']:<4d} detected, {k['joined']:4d} "
              f"joined; distance {k['distance_p50_p95_max']}, bits {k['bits_p50_p95_max']}")
    apart = np.array(apart).reshape(-1, 2)
    out["different_photos"] = {
        "pairs": len(apart), "joined": int(sum(joined(d, b) for d, b in apart)),
        "distance_min_p1_p50": np.percentile(apart[:, 0], [0, 1, 50]).round(3).tolist()
        if len(apart) else None,
        "bits_min_p1_p50": np.percentile(apart[:, 1], [0, 1, 50]).tolist() if len(apart) else None}
    a = out["different_photos"]
    print(f"different photos of one person: {a['pairs']} pairs, {a['joined']} joined; "
          f"distance {a['distance_min_p1_p50']}, bits {a['bits_min_p1_p50']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
