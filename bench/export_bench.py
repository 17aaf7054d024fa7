#!/usr/bin/env python3
"""enrich ms per face and export-swap ms per exported PNG on ../shared/data/labeled, and
what the export wrote (the swap folder's bytes, PNG sizes, the largest upscale).

Embeds labeled/ once into a temp cache, then --repeat times: enrich a fresh copy of that
cache (model load excluded: the models are loaded once and warmed up before timing), and
export-swap a refine result into a fresh OUT. Prints medians; the last line is one JSON
object with every figure.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import sort_faces as sf  # noqa: E402

DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "labeled")
SMOKE_PEOPLE = ("Hugo_Chavez", "Tony_Blair")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each step")
    ap.add_argument("--data", default=DATA, help="photo folder to embed")
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds end to end: two people of --data, one run "
                         "(checks the bench still works; its figures mean nothing)")
    args = ap.parse_args(argv)
    sf.CONSOLE.quiet = True
    tmp = tempfile.mkdtemp()
    if args.smoke:
        args.repeat, small = 1, os.path.join(tmp, "data")
        for person in SMOKE_PEOPLE:
            shutil.copytree(os.path.join(args.data, person), os.path.join(small, person))
        args.data = small
    base = os.path.join(tmp, "base.npz")
    sf.embed_tree(args.data, base)
    cache = sf.load_cache(base)
    pack = sf.locate_pack(cache.meta["pack"]["name"], roles=("lmk2d",))
    load_s = statistics.median(timed(lambda: sf.load_models(pack))[0] for _ in range(3))
    enrich_s, faces = [], cache.n_faces
    for r in range(args.repeat):
        path = os.path.join(tmp, f"e{r}.npz")
        shutil.copy(base, path)
        # enrich_cache loads its model inside: subtract the model load and the fixed cost
        # of a run that has nothing to do (cache read, hash check), both measured here
        full, st = timed(lambda: sf.enrich_cache(path))
        noop, _ = timed(lambda: sf.enrich_cache(path))
        enrich_s.append(full - noop - load_s)
        assert st.faces == faces, (st.faces, faces)
    enriched = os.path.join(tmp, "e0.npz")
    ref = os.path.join(tmp, "ref")
    assert sf.main(["refine", enriched, ref, "-q", "--min-short", "40", "--min-faces", "6",
                    "--log-dir", os.path.join(tmp, "logs")]) == 0
    export_s, pngs = [], 0
    for r in range(args.repeat):
        out = os.path.join(tmp, f"swap{r}")
        t, rc = timed(lambda: sf.main(["export-swap", enriched,
                                       os.path.join(ref, "refine_manifest.json"), out, "-q",
                                       "--min-face-short", "40",
                                       "--log-dir", os.path.join(tmp, "logs")]))
        assert rc == 0
        with open(os.path.join(out, "manifest.json")) as f:
            entries = json.load(f)["facesets"]
        pngs = sum(e["pngs"] for e in entries)
        export_s.append(t)
    records = []                                   # what the last export wrote, per PNG
    for e in entries:
        with open(os.path.join(out, e["path"], "manifest.json")) as f:
            records += json.load(f)["pngs"]
    out_bytes = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(out)
                    for n in ns)
    sizes = sorted(r.get("size", sf.OUT_SIZE) for r in records)   # before 0.3: all 512
    e_ms = 1000 * statistics.median(enrich_s) / faces
    x_ms = 1000 * statistics.median(export_s) / max(1, pngs)
    print(f"enrich: {faces} faces, median {statistics.median(enrich_s):.2f} s "
          f"-> {e_ms:.1f} ms per face (runs: {', '.join(f'{s:.2f}' for s in enrich_s)})")
    print(f"export-swap: {pngs} PNGs, median {statistics.median(export_s):.2f} s "
          f"-> {x_ms:.1f} ms per PNG (runs: {', '.join(f'{s:.2f}' for s in export_s)}; "
          f"includes detector load and the one-face re-check)")
    small = sum(v < sf.OUT_SIZE for v in sizes)
    print(f"swap folder: {out_bytes / 1e6:.1f} MB; {small} of {len(sizes)} PNGs smaller than "
          f"{sf.OUT_SIZE} px (median {statistics.median(sizes) if sizes else 0} px), "
          f"largest upscale {max((r.get('upscale', 0) for r in records), default=0):.2f}x")
    print(json.dumps({"faces": faces, "model_load_s": round(load_s, 3),
                      "enrich_ms_per_face": round(e_ms, 2), "pngs": pngs,
                      "export_ms_per_png": round(x_ms, 2), "repeat": args.repeat,
                      "swap_bytes": out_bytes, "pngs_below_out_size": small,
                      "png_size_median": statistics.median(sizes) if sizes else 0,
                      "max_upscale": max((r.get("upscale", 0) for r in records), default=0),
                      "enrich_runs_s": [round(s, 3) for s in enrich_s],
                      "export_runs_s": [round(s, 3) for s in export_s]}))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
