#!/usr/bin/env python3
"""Benchmark `sort_faces.embed_tree` against a naive insightface-style loop.

Naive loop (the baseline), per image, serially: full decode with cv2.imread, SCRFD
detection at a 640x640 letterbox (det.detect(img, input_size=(640, 640)), as insightface's
FaceAnalysis does by default), then one recognizer call per face (norm_crop + get_feat).
No hashing, no prefetch, no cache.

The tool: sort_faces.embed_tree(src, fresh_temp_cache, ...) with its defaults, plus thread
layouts (ORT intra-op threads x parallel workers, each doing a whole photo). It does
strictly more work than the naive loop: it scans the tree, hashes every file, handles EXIF orientation, writes and consolidates
the .npz cache, and SHA-256-checks the model files on every call (locate_pack).

Model load time is EXCLUDED from both sides: load_models() is memoised per thread count and
warmed before timing, so both sides use the very same (already loaded) ONNX sessions;
ms/image covers the images only. Everything else embed_tree does is inside the timing.

Both sides run in this process on the same files; methods are run round-robin within each
repeat so that drift in machine load hits all of them alike; the median is reported.
The last line of stdout is one JSON object with all figures.

--module benchmarks another sort_faces.py (e.g. `git show REV:sort_faces.py > /tmp/sf.py`),
to compare revisions or settings; the JSON records the file's SHA-256.
"""

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

sort_faces = None     # the module under test; imported in main() (see --module)

DEFAULT_BIG = ("dlib_bald_guys.jpg,face_recognition_obama_and_biden.jpg,insightface_t1.jpg,"
               "wikimedia_Abstract_Wikipedia_Team_group_2022.jpg,"
               "wikimedia_Group_Photo_NWPApril2021.jpg,wikimedia_Modi_with_Obama.jpg")


# ----------------------------------------------------------------------------
# Models: loaded once per thread count, shared by both sides
# ----------------------------------------------------------------------------
_MODEL_CACHE = {}
_ORIG_LOAD_MODELS = None
MODEL_LOAD_S = {}


def import_tool(path):
    """Import sort_faces from `path` and route its load_models through the memo below."""
    global sort_faces, _ORIG_LOAD_MODELS
    import importlib.util
    spec = importlib.util.spec_from_file_location("sort_faces", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sort_faces"] = mod
    spec.loader.exec_module(mod)
    sort_faces = mod
    _ORIG_LOAD_MODELS = mod.load_models
    # embed_tree's _LazyModels calls sort_faces.load_models: route it through the memo so
    # the tool never pays model load inside the timed region (nor does the naive loop).
    mod.load_models = memo_load_models
    return mod


def memo_load_models(pack, threads=None, det_thresh=None, device="auto"):
    """sort_faces.load_models with its keyword signature, memoised."""
    threads = threads or os.cpu_count() or 1
    if det_thresh is None:
        det_thresh = sort_faces.DET_THRESH
    key = (pack.name, pack.folder, threads, det_thresh, device)
    if key not in _MODEL_CACHE:
        t0 = time.perf_counter()
        _MODEL_CACHE[key] = _ORIG_LOAD_MODELS(pack, threads=threads, det_thresh=det_thresh,
                                              device=device)
        MODEL_LOAD_S[threads] = time.perf_counter() - t0
    return _MODEL_CACHE[key]


def plain_models(pack, threads):
    """The naive side's models: insightface as it comes (model_zoo.get_model on the shipped
    files), never the tool's own loading (which rewrites the recognizer)."""
    from insightface.model_zoo import model_zoo
    with contextlib.redirect_stdout(sys.stderr):
        det = model_zoo.get_model(pack.files["det"], providers=["CPUExecutionProvider"],
                                  sess_options=sort_faces._session_options(threads))
        det.prepare(ctx_id=-1, input_size=(640, 640), det_thresh=sort_faces.DET_THRESH)
        rec = model_zoo.get_model(pack.files["rec"], providers=["CPUExecutionProvider"],
                                  sess_options=sort_faces._session_options(threads))
        rec.prepare(ctx_id=-1)
    return {"det": det, "rec": rec}


def warm_models(models, img):
    """Untimed: both detector paths (640 letterbox, tool canvas) and recognizer batches."""
    from insightface.utils import face_align
    det, rec = models["det"], models["rec"]
    sort_faces.detect_faces(det, img)
    _, kps = det.detect(img, input_size=(640, 640))
    if kps is not None and len(kps):
        crop = face_align.norm_crop(img, kps[0])
        rec.get_feat([crop])
        rec.get_feat([crop] * 4)


# ----------------------------------------------------------------------------
# Image sets
# ----------------------------------------------------------------------------
def list_images(root):
    """Same files, same order as embed_tree sees them."""
    return [p for p, _ in sort_faces.scan_images(root, lambda p, r: None)]


def longest_side(path):
    from PIL import Image
    with Image.open(path) as im:
        return max(im.size)


def first_images(root, n, dst):
    """A folder holding copies of the first n images of root."""
    os.makedirs(dst, exist_ok=True)
    for i, p in enumerate(list_images(root)[:n]):
        shutil.copy2(p, os.path.join(dst, f"{i:03d}_{os.path.basename(p)}"))
    return dst


def make_large_set(groups, dst, min_side):
    os.makedirs(dst, exist_ok=True)
    for p in list_images(groups):
        if longest_side(p) >= min_side:
            shutil.copy2(p, os.path.join(dst, os.path.basename(p)))
    return dst


def make_phone_set(labeled, dst, n, size, quality, seed=0):
    """n phone-like photos: 1-3 labeled photos of different people side by side, each
    upscaled to 40-60 % of the frame height, on a blurred backdrop; JPEG at `quality`."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    W, H = size
    people = sorted(d for d in os.listdir(labeled) if d != "distractors")
    os.makedirs(dst, exist_ok=True)
    for k in range(n):
        who = rng.choice(people, size=int(rng.integers(1, 4)), replace=False)
        tiles = []
        for person in who:
            files = sorted(os.listdir(os.path.join(labeled, person)))
            img = cv2.imread(os.path.join(labeled, person, files[int(rng.integers(len(files)))]))
            side = int(H * rng.uniform(0.4, 0.6))
            tiles.append(cv2.resize(img, (side, side), interpolation=cv2.INTER_CUBIC))
        canvas = cv2.resize(cv2.GaussianBlur(tiles[0], (0, 0), 25), (W, H))
        step = W // len(tiles)
        for t, tile in enumerate(tiles):
            x = t * step + (step - tile.shape[1]) // 2
            y = int(rng.integers(0, H - tile.shape[0]))
            canvas[y:y + tile.shape[0], max(0, x):max(0, x) + tile.shape[1]] = \
                tile[:, :min(tile.shape[1], W - max(0, x))]
        cv2.imwrite(os.path.join(dst, f"phone_{k:03d}.jpg"), canvas,
                    [cv2.IMWRITE_JPEG_QUALITY, quality])
    return dst


def make_big_set(groups, names, dst, size, quality):
    """Centre-crop each group photo to the target aspect, upscale, save as JPEG."""
    from PIL import Image, ImageOps
    W, H = size
    os.makedirs(dst, exist_ok=True)
    for name in names:
        with Image.open(os.path.join(groups, name)) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = ImageOps.fit(im, (W, H), method=Image.Resampling.BICUBIC)
            out = os.path.join(dst, os.path.splitext(name)[0] + f"_{W}x{H}.jpg")
            im.save(out, "JPEG", quality=quality)
    return dst


# ----------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------
def naive_run(paths, models):
    """Baseline: serial imread -> 640 letterbox detect -> one recognizer call per face."""
    import cv2
    from insightface.utils import face_align
    det, rec = models["det"], models["rec"]
    faces = 0
    for p in paths:
        img = cv2.imread(p)
        if img is None:
            continue
        _, kpss = det.detect(img, input_size=(640, 640))
        if kpss is None:
            continue
        for k in kpss:
            crop = face_align.norm_crop(img, landmark=k)
            rec.get_feat([crop])
            faces += 1
    return faces, 0


def tool_run(src, tmp_root, threads, workers):
    """embed_tree into a fresh cache; returns (faces, failed)."""
    d = tempfile.mkdtemp(prefix="cache-", dir=tmp_root)
    try:
        kw = {"device": DEVICE}
        if threads is not None:
            kw["threads"] = threads
        if workers is not None:
            kw["workers"] = workers
        stats = sort_faces.embed_tree(src, os.path.join(d, "c.npz"), "default", **kw)
        return stats.faces, stats.failed
    finally:
        shutil.rmtree(d, ignore_errors=True)


NAIVE_PROCESS = """
import sys, time, glob, cv2
from insightface.model_zoo import model_zoo
from insightface.utils import face_align
det = model_zoo.get_model(sys.argv[1], providers=["CPUExecutionProvider"])
det.prepare(ctx_id=-1, input_size=(640, 640), det_thresh=0.5)
rec = model_zoo.get_model(sys.argv[2], providers=["CPUExecutionProvider"])
rec.prepare(ctx_id=-1)
n = 0
for p in sys.argv[3:]:
    img = cv2.imread(p)
    _, kpss = det.detect(img, input_size=(640, 640))
    for k in (kpss if kpss is not None else []):
        rec.get_feat([face_align.norm_crop(img, landmark=k)])
        n += 1
print(n)
"""


def whole_process(src, files, tmp_root, modules):
    """Seconds of one whole process each, start-up and model load included: the `embed`
    of each sort_faces.py in modules (into a fresh cache), then the naive loop (the same
    insightface models), one after the other. Returns [seconds per module..., naive]."""
    import subprocess
    pack = sort_faces.locate_pack("default")
    out = []
    for module in modules:
        d = tempfile.mkdtemp(prefix="whole-", dir=tmp_root)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, module, "embed", src, os.path.join(d, "c.npz"), "-q",
                        "--log-dir", os.path.join(d, "logs"), "--device", DEVICE],
                       check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", NAIVE_PROCESS, pack.files["det"], pack.files["rec"],
                    *files], check=True, capture_output=True)
    return out + [time.perf_counter() - t0]


def whole_figures(n, runs, baseline):
    """The whole-process figures of runs (whole_process() per round) over n photos."""
    med = [statistics.median(r[k] for r in runs) for k in range(len(runs[0]))]
    tool_s, naive_s = med[-2], med[-1]
    fig = {"tool_s": round(tool_s, 3), "naive_s": round(naive_s, 3),
           "tool_photos_per_s": round(n / tool_s, 2),
           "naive_photos_per_s": round(n / naive_s, 2),
           "ratio_vs_naive": round(naive_s / tool_s, 2),
           "runs_s": [[round(x, 3) for x in r] for r in runs]}
    if baseline:
        fig.update(baseline_s=round(med[0], 3), baseline_photos_per_s=round(n / med[0], 2),
                   baseline_ratio_vs_naive=round(naive_s / med[0], 2),
                   speedup_vs_baseline=round(med[0] / tool_s, 3))
    return fig


def time_call(fn):
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


# ----------------------------------------------------------------------------
# Stage breakdown (serial, one pass, perf_counter around each stage)
# ----------------------------------------------------------------------------
def stage_breakdown(paths, models, tool_models):
    """Serial per-stage ms of the naive loop (models) and of the tool's way (tool_models)."""
    import cv2
    from insightface.utils import face_align
    det, rec = models["det"], models["rec"]
    tdet, trec = tool_models["det"], tool_models["rec"]
    min_side = sort_faces.DET_SIZE * sort_faces.DECODE_FACTOR
    naive = dict(decode=0.0, detect=0.0, embed=0.0)
    tool = dict(read=0.0, hash=0.0, decode=0.0, detect=0.0, align_embed=0.0)
    phash = getattr(sort_faces, "perceptual_hashes", None)    # newer versions only
    if phash:
        tool["phash"] = 0.0
    det_px = dict(naive=0, tool=0)
    dec_px = dict(naive=0, tool=0)
    for p in paths:
        t0 = time.perf_counter()
        img = cv2.imread(p)
        t1 = time.perf_counter()
        _, kpss = det.detect(img, input_size=(640, 640))
        t2 = time.perf_counter()
        for k in (kpss if kpss is not None else []):
            rec.get_feat([face_align.norm_crop(img, landmark=k)])
        t3 = time.perf_counter()
        naive["decode"] += t1 - t0
        naive["detect"] += t2 - t1
        naive["embed"] += t3 - t2
        det_px["naive"] += 640 * 640
        dec_px["naive"] += img.shape[0] * img.shape[1]

        t0 = time.perf_counter()
        with open(p, "rb") as f:
            data = f.read()
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        dec = sort_faces.decode_image(data, min_side)
        t3 = time.perf_counter()
        view_of = getattr(sort_faces, "detector_view", None)   # newer versions: the photo
        view = view_of(dec.bgr) if view_of else None            # hash is made from it
        bbox, kps, _ = sort_faces.detect_faces(tdet, dec.bgr, **({"view": view} if view_of
                                                                  else {}))
        t4 = time.perf_counter()
        if len(bbox):
            crops = [face_align.norm_crop(dec.bgr, k) for k in kps]
            trec.get_feat(crops)
            [cv2.Laplacian(cv2.cvtColor(c, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var() for c in crops]
        t5 = time.perf_counter()
        if phash:
            phash(dec.bgr if view is None else view)
            tool["phash"] += time.perf_counter() - t5
        tool["read"] += t1 - t0
        tool["hash"] += t2 - t1
        tool["decode"] += t3 - t2
        tool["detect"] += t4 - t3
        tool["align_embed"] += t5 - t4
        h, w = dec.bgr.shape[:2]
        s = min(1.0, sort_faces.DET_SIZE / max(h, w))
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        det_px["tool"] += (max(-(-sh // 32) * 32, sort_faces.DET_MIN_CANVAS)
                           * max(-(-sw // 32) * 32, sort_faces.DET_MIN_CANVAS))
        dec_px["tool"] += h * w
    n = len(paths)
    ms = lambda d: {k: round(1000 * v / n, 2) for k, v in d.items()}  # noqa: E731
    return {"naive_ms_per_image": ms(naive), "tool_ms_per_image": ms(tool),
            "decoded_mpix_per_image": {k: round(v / n / 1e6, 3) for k, v in dec_px.items()},
            "det_canvas_kpix_per_image": {k: round(v / n / 1e3, 1) for k, v in det_px.items()}}


def cprofile_top(fn, n):
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(n)
    return buf.getvalue()


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def parse_layouts(text):
    out = []
    for item in text.split(","):
        t, d = item.strip().lower().split("x")
        out.append((int(t), int(d)))
    return out


def machine():
    model = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version()}


def versions():
    out = {}
    for mod in ("onnxruntime", "insightface", "cv2", "PIL", "numpy"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--module", default=os.path.join(ROOT, "sort_faces.py"),
                   help="the sort_faces.py to benchmark (e.g. a snapshot of a commit)")
    p.add_argument("--data", default=os.path.normpath(os.path.join(ROOT, "..", "shared", "data")),
                   help="folder holding labeled/ and groups/")
    p.add_argument("--sets", default="labeled,large,big,phone",
                   help="comma list of image sets to run: labeled, large, big, phone")
    p.add_argument("--phone-count", type=int, default=60,
                   help="photos in the 'phone' set (1-3 labeled faces on a 4000x3000 JPEG)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where the tool's runs put the models (the naive baseline stays on "
                        "the CPU, so x naive is the GPU's gain over the CPU loop)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs per method and set; the median is reported")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs per method and set before the timed ones")
    p.add_argument("--layouts", default="1x2,2x1,1x1,2x2",
                   help="tool variants as THREADSxWORKERS (ORT intra-op threads x worker "
                        "threads that each read, decode, detect and embed a photo; 0 = all in "
                        "the main thread), comma separated")
    p.add_argument("--no-default", action="store_true",
                   help="do not run embed_tree with its own defaults when they differ from "
                        "every --layouts entry")
    p.add_argument("--large-min-side", type=int, default=1000,
                   help="pixels: group photos whose longest side is at least this form "
                        "the 'large' set")
    p.add_argument("--big-sources", default=DEFAULT_BIG,
                   help="comma list of groups/ files upscaled into the 'big' set")
    p.add_argument("--big-size", default="4000x3000",
                   help="WIDTHxHEIGHT of the 'big' set (centre-cropped, bicubic upscale)")
    p.add_argument("--big-quality", type=int, default=92, help="JPEG quality of the 'big' set")
    p.add_argument("--tmp-dir", default=None,
                   help="where temporary image sets and caches go; unset: the system temp folder")
    p.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                   help="also print a serial per-stage time breakdown (decode / detect / "
                        "embed / hash) of both sides per set")
    p.add_argument("--whole", action=argparse.BooleanOptionalAction, default=True,
                   help="also time whole processes (start-up and model load included): "
                        "`sort_faces.py embed` against the naive loop, --repeat times each")
    p.add_argument("--baseline", default=None, metavar="MODULE",
                   help="another sort_faces.py whose whole `embed` process is timed in the "
                        "same rounds as --module's (e.g. the last commit's, to measure a "
                        "change against it); unset: none")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="images per set: the first N of each (0 = all)")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds end to end: 3 labeled, 1 big and 3 phone images "
                        "(1600x1200), "
                        "one layout, one run, no warm-up (checks the bench still works; "
                        "its figures mean nothing)")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="print the top N cProfile entries (by own time) of one default "
                        "embed_tree run per set; 0 = off")
    return p


DEVICE = "cpu"        #: --device of the tool's runs


def main(argv=None):
    global DEVICE
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.sets, args.limit, args.big_size = "labeled,big,phone", 3, "1600x1200"
        args.phone_count = 3
        args.big_sources = DEFAULT_BIG.split(",")[0]
        args.repeat, args.warmup, args.layouts, args.no_default = 1, 0, "1x2", True
    DEVICE = args.device
    import_tool(os.path.abspath(args.module))
    warnings.simplefilter("ignore", FutureWarning)    # skimage deprecation in insightface
    sort_faces.CONSOLE.quiet = True                   # no progress bars
    import cv2

    sets_wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    layouts = parse_layouts(args.layouts)
    ncpu = os.cpu_count() or 1
    default_layout = (1, ncpu)        # embed_tree(threads=1, workers=None -> cpu_count)
    methods = [("naive", None)]
    for t, d in layouts:
        tag = f"tool t{t} w{d}" + (" (default)" if (t, d) == default_layout else "")
        methods.append((tag, (t, d)))
    if default_layout not in layouts and not args.no_default:
        methods.insert(1, ("tool (default)", (None, None)))

    tmp_root = tempfile.mkdtemp(prefix="embed_bench-", dir=args.tmp_dir)
    try:
        groups = os.path.join(args.data, "groups")
        labeled = os.path.join(args.data, "labeled")
        sets = {}
        for name in sets_wanted:
            if name == "labeled":
                sets[name] = labeled
            elif name == "large":
                sets[name] = make_large_set(groups, os.path.join(tmp_root, "large"),
                                            args.large_min_side)
            elif name == "phone":
                W, H = (int(v) for v in args.big_size.lower().split("x"))
                sets[name] = make_phone_set(labeled, os.path.join(tmp_root, "phone"),
                                            args.phone_count, (W, H), 90)
            elif name == "big":
                W, H = (int(v) for v in args.big_size.lower().split("x"))
                sets[name] = make_big_set(groups, [n.strip() for n in
                                                   args.big_sources.split(",") if n.strip()],
                                          os.path.join(tmp_root, "big"), (W, H),
                                          args.big_quality)
            else:
                raise SystemExit(f"unknown set {name!r}")
        if args.limit:
            sets = {k: first_images(v, args.limit, os.path.join(tmp_root, f"{k}-{args.limit}"))
                    for k, v in sets.items()}
        files = {k: list_images(v) for k, v in sets.items()}
        for k, v in files.items():
            if not v:
                raise SystemExit(f"set {k}: no images under {sets[k]}")

        # Load + warm every model configuration used, outside all timings.
        pack = sort_faces.locate_pack("default")
        warm_img = cv2.imread(files[next(iter(files))][0])
        thread_counts = {ncpu} | {t for t, _ in layouts}
        for t in sorted(thread_counts):
            warm_models(memo_load_models(pack, threads=t, device=DEVICE), warm_img)
        naive_models = plain_models(pack, ncpu)
        warm_models(naive_models, warm_img)

        def runner(set_name, spec):
            if spec is None:
                return lambda: naive_run(files[set_name], naive_models)
            t, d = spec
            return lambda: tool_run(sets[set_name], tmp_root, t, d)

        results = {}
        print(f"# embed benchmark: {machine()['nproc']} CPUs, {machine()['cpu_model']}; "
              f"repeat={args.repeat}, warmup={args.warmup}", file=sys.stderr)
        for set_name in sets:
            load_before = os.getloadavg()
            times = {m: [] for m, _ in methods}
            faces = {}
            failed = {}
            for _ in range(args.warmup):
                for m, spec in methods:
                    faces[m], failed[m] = runner(set_name, spec)()
            for r in range(args.repeat):
                for m, spec in methods:
                    dt, (nf, nfail) = time_call(runner(set_name, spec))
                    times[m].append(dt)
                    faces[m], failed[m] = nf, nfail
                print(f"# {set_name}: repeat {r + 1}/{args.repeat}: "
                      + ", ".join(f"{m}={times[m][-1]:.2f}s" for m, _ in methods),
                      file=sys.stderr)
            n = len(files[set_name])
            base = statistics.median(times["naive"])
            rows = []
            for m, spec in methods:
                med = statistics.median(times[m])
                rows.append({
                    "method": m,
                    "threads": None if spec is None else (spec[0] or ncpu),
                    "workers": None if spec is None else
                    (ncpu if spec[1] is None else spec[1]),
                    "images": n, "faces": faces[m], "failed": failed[m],
                    "median_s": round(med, 4),
                    "ms_per_image": round(1000 * med / n, 2),
                    "best_ms_per_image": round(1000 * min(times[m]) / n, 2),
                    "faces_per_s": round(faces[m] / med, 1) if med > 0 else None,
                    "ratio_vs_naive": round(base / med, 2) if med > 0 else None,
                    "runs_s": [round(x, 4) for x in times[m]],
                    "spread_pct": round(100 * (max(times[m]) - min(times[m])) / med, 1),
                })
            results[set_name] = {"src": sets[set_name] if set_name == "labeled"
                                 else f"<tmp>/{set_name}",
                                 "images": n, "files": [os.path.basename(p)
                                                        for p in files[set_name]]
                                 if set_name != "labeled" else None,
                                 "methods": rows,
                                 "loadavg_1m_before_after": [round(load_before[0], 2),
                                                             round(os.getloadavg()[0], 2)]}
            if args.stages:
                results[set_name]["stages"] = stage_breakdown(
                    files[set_name], naive_models,
                    memo_load_models(pack, threads=ncpu, device=DEVICE))
            if args.whole and (not args.smoke or set_name == "phone"):
                modules = ([os.path.abspath(args.baseline)] if args.baseline else []) + [
                    os.path.abspath(args.module)]
                one = os.path.join(tmp_root, f"one-{set_name}")
                os.makedirs(one, exist_ok=True)
                shutil.copy(files[set_name][0], one)
                whole, start = [], []
                for _ in range(args.repeat):         # each round: every side, one photo too
                    whole.append(whole_process(sets[set_name], files[set_name], tmp_root,
                                               modules))
                    start.append(whole_process(one, files[set_name][:1], tmp_root, modules))
                results[set_name]["whole_process"] = whole_figures(n, whole, args.baseline)
                results[set_name]["one_photo_process"] = whole_figures(1, start, args.baseline)
            if args.cprofile:
                print(f"\n## cProfile, one default embed_tree run on {set_name}",
                      file=sys.stderr)
                print(cprofile_top(lambda: tool_run(sets[set_name], tmp_root, None, None),
                                   args.cprofile), file=sys.stderr)

        # ---- table ----
        hdr = ("set", "method", "images", "faces", "ms/image", "faces/s", "x naive", "spread",
               "best ms/img")
        lines = [hdr]
        for set_name, res in results.items():
            for row in res["methods"]:
                lines.append((set_name, row["method"], str(row["images"]), str(row["faces"]),
                              f"{row['ms_per_image']:.1f}", f"{row['faces_per_s']:.1f}",
                              f"{row['ratio_vs_naive']:.2f}", f"{row['spread_pct']:.0f}%",
                              f"{row['best_ms_per_image']:.1f}"))
        widths = [max(len(r[i]) for r in lines) for i in range(len(hdr))]
        print("Timing: models preloaded and warmed for both sides (model load excluded); "
              f"median of {args.repeat} runs; ms/image over the images only; "
              "x naive = naive_time / method_time; spread = (max-min)/median; "
              "best = fastest run.")
        print("| " + " | ".join(h.ljust(w) for h, w in zip(hdr, widths)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in lines[1:]:
            print("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(r, widths))) + " |")
        for set_name, res in results.items():
            if "whole_process" in res:
                w = res["whole_process"]
                print(f"whole process, {set_name}: tool {w['tool_photos_per_s']} photos/s, "
                      f"naive {w['naive_photos_per_s']} photos/s, {w['ratio_vs_naive']}x")
                o = res["one_photo_process"]
                print(f"one-photo process, {set_name}: tool {o['tool_s']} s, naive "
                      f"{o['naive_s']} s")
                if args.baseline:
                    print(f"  baseline {args.baseline}: whole {w['baseline_photos_per_s']} "
                          f"photos/s ({w['baseline_ratio_vs_naive']}x naive), one photo "
                          f"{o['baseline_s']} s; tool / baseline speed: whole "
                          f"{w['speedup_vs_baseline']}x, one photo {o['speedup_vs_baseline']}x")
        if args.stages:
            print("\nSerial stage breakdown, ms/image (threads="
                  f"{ncpu}, no prefetch; one pass):")
            for set_name, res in results.items():
                st = res["stages"]
                print(f"  {set_name}: naive {st['naive_ms_per_image']} | tool "
                      f"{st['tool_ms_per_image']} | decoded Mpx/img "
                      f"{st['decoded_mpix_per_image']} | det canvas kpx/img "
                      f"{st['det_canvas_kpix_per_image']}")
        summary = {
            "benchmark": "embed",
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "timing": "models preloaded and warmed for both sides (load excluded); "
                      "median wall time of the timed runs; ms/image over images only",
            "module": os.path.abspath(args.module),
            "module_sha256": hashlib.sha256(open(args.module, "rb").read()).hexdigest(),
            "repeat": args.repeat, "warmup": args.warmup,
            "machine": machine(), "versions": versions(),
            "model_load_s_per_threads": {str(k): round(v, 3) for k, v in MODEL_LOAD_S.items()},
            "sets": results,
        }
        print(json.dumps(summary, separators=(",", ":")))
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
