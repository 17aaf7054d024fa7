"""Shared fixtures: the real photos in ../shared/data, one embedded cache of labeled/
reused by the whole session, and helpers to build small source trees in tmp."""
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCRIPT = ROOT / "sort_faces.py"
sys.path.insert(0, str(ROOT))

import sort_faces  # noqa: E402

#: Put `pytestmark = requires_data` in a module whose tests all read the real photos.
requires_data = pytest.mark.skipif(
    not (DATA / "labeled").is_dir(),
    reason=f"real test photos not found in {DATA} (expected ../shared/data beside the repo)")


def labeled_photos():
    """Every labeled photo, as paths relative to labeled/, sorted."""
    root = DATA / "labeled"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))


def spread(items, n):
    """n items spread evenly over a sorted list (so a subset spans many people)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def count_files(path):
    """Files under path (0 while it does not exist)."""
    return sum(len(files) for _, _, files in os.walk(path))


def remove_cache(cache):
    """A cache and everything beside it (parts, thumbnails, lock), as if never made."""
    for p in (Path(str(cache) + suffix) for suffix in ("", ".parts", ".thumbs", ".lock")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


#: A guard against a hung run only: no test waits for or measures a duration.
HANG_GUARD_S = 900


def signal_mid_run(argv, ready, sig, mid_way, *, stderr_path, reset=lambda: None, tries=5):
    """Run the tool (argv after the interpreter; stderr into stderr_path), send it `sig` as
    soon as ready() holds, and return the finished Popen (its stderr as .err) once
    mid_way(proc) proves the signal landed while work remained. A run that ended before the
    signal, or got it after its work was done, proves nothing: reset() and try again.
    Nothing here races the clock: the trigger is what the run has done (files it wrote,
    progress it printed), the proof is what it left."""
    for _ in range(tries):
        reset()
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen([sys.executable, *map(str, argv)],
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                guard = time.monotonic() + HANG_GUARD_S
                while proc.poll() is None and not ready():
                    assert time.monotonic() < guard, f"hung: {argv}"
                    time.sleep(0.005)
                if proc.poll() is None:
                    proc.send_signal(sig)
                proc.wait(timeout=HANG_GUARD_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        proc.err = Path(stderr_path).read_text(errors="replace")
        if mid_way(proc):
            return proc
    pytest.fail(f"{tries} runs of {argv[:2]} all finished before {sig!r} landed")


@pytest.fixture(autouse=True)
def _no_leaks(tmp_path_factory, monkeypatch):
    """Every run logs into the session's temp folder, never the repo's work/logs; console
    state set by one test (-q) does not leak into the next."""
    monkeypatch.setattr(sort_faces, "LOG_DIR", str(tmp_path_factory.getbasetemp() / "logs"))
    yield
    sort_faces.CONSOLE.quiet = False
    sort_faces.CONSOLE.close_log()


@pytest.fixture(scope="session")
def data():
    if not (DATA / "labeled").is_dir():
        pytest.skip(f"real test photos not found in {DATA}")
    return DATA


@pytest.fixture(scope="session")
def labeled_cache(data, tmp_path_factory):
    """labeled/ embedded once (281 photos, ~12 s) into a tmp cache; returns its path.
    Tests must not write into it."""
    tmp = tmp_path_factory.mktemp("labeled_cache")
    cache = tmp / "labeled.npz"
    rc = sort_faces.main(["embed", str(data / "labeled"), str(cache), "-q",
                          "--log-dir", str(tmp / "logs")])
    assert rc == 0
    return cache


@pytest.fixture
def copy_photos(data):
    """copy_photos(dst, relpaths, src='labeled') -> [copied paths]: real photos copied into
    a tmp tree, keeping their relative folders; relpaths may also be a count (spread over
    labeled/)."""
    def copy(dst, relpaths, src="labeled"):
        if isinstance(relpaths, int):
            relpaths = spread(labeled_photos(), relpaths)
        out = []
        for rel in relpaths:
            target = Path(dst) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data / src / rel, target)
            out.append(target)
        return out
    return copy


def _tree_digest(path):
    """{relpath: sha256} of every file under path; symlinks recorded by their target
    (never followed, so loops and broken links are fine)."""
    out = {}
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = "link -> " + os.readlink(full)
            elif name in files:
                st = os.stat(full)
                if not stat.S_ISREG(st.st_mode):       # a FIFO: never open it
                    out[rel] = f"special mode={st.st_mode:o}"
                    continue
                if not os.access(full, os.R_OK):
                    out[rel] = f"unreadable mode={st.st_mode:o}"
                    continue
                with open(full, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
                out[rel] += f" mode={st.st_mode:o} mtime={st.st_mtime_ns}"
    return out


@pytest.fixture
def tree_digest():
    """tree_digest(path) -> {relpath: sha256 + mode + mtime} of every file: equal before
    and after a run means the source tree was not touched."""
    return _tree_digest


# ---------------------------------------------------------------------------- ground truth
def labeled_truth(cache):
    """cache face index -> identity for the labeled face of every labeled/ photo found (the
    labeled_faces.csv box, matched at IoU >= 0.3); each distractor is its own identity."""
    import csv
    import numpy as np
    root = os.path.realpath(DATA / "labeled")
    by_path = {os.path.realpath(p): i for p, i in cache.by_path.items()}
    truth = {}
    with open(DATA / "labeled_faces.csv", newline="") as f:
        for row in csv.DictReader(f):
            box = [float(v) for v in row["labeled_face_box_x1_y1_x2_y2"].split()]
            file = by_path.get(os.path.join(root, row["relpath"]))
            if file is None or not box:
                continue
            faces = np.flatnonzero(cache.face_file == file)
            best = max(faces, key=lambda i: sort_faces.box_iou(cache.face_bbox[i], box),
                       default=None)
            if best is not None and sort_faces.box_iou(cache.face_bbox[best], box) >= sort_faces.SAME_FACE_IOU:
                who = row["identity"]
                truth[int(best)] = who if who != "distractors" else "distractor:" + row["relpath"]
    return truth


def calib_truth(cache):
    """cache face index -> identity for calib/ (LFW convention: the labeled face is the one
    nearest the image centre); each distractor is its own identity."""
    import csv
    import numpy as np
    root = os.path.realpath(DATA / "calib")
    by_path = {os.path.realpath(p): i for p, i in cache.by_path.items()}
    truth = {}
    with open(DATA / "calib.csv", newline="") as f:
        for row in csv.DictReader(f):
            file = by_path.get(os.path.join(root, row["relpath"]))
            faces = np.flatnonzero(cache.face_file == file) if file is not None else []
            if not len(faces):
                continue
            b = cache.face_bbox[faces]
            w, h = float(row["width"]), float(row["height"])
            d = np.hypot((b[:, 0] + b[:, 2]) / 2 - w / 2, (b[:, 1] + b[:, 3]) / 2 - h / 2)
            if d.min() <= 0.25 * max(w, h):
                truth[int(faces[d.argmin()])] = row["identity"]
    return truth


def scores(true, pred):
    """Pairwise precision/recall/F and BCubed precision/recall/F of two labelings."""
    from collections import Counter
    pairs = lambda labels: sum(c * (c - 1) // 2 for c in Counter(labels).values())
    tp, p_pairs, t_pairs = pairs(zip(true, pred)), pairs(pred), pairs(true)
    pp, pr = (tp / p_pairs if p_pairs else 1.0), (tp / t_pairs if t_pairs else 1.0)
    joint, tc, pc = Counter(zip(true, pred)), Counter(true), Counter(pred)
    bp = sum(n * n / pc[p] for (t, p), n in joint.items()) / len(true)
    br = sum(n * n / tc[t] for (t, p), n in joint.items()) / len(true)
    f = lambda a, b: 2 * a * b / (a + b) if a + b else 0.0
    return {"pairwise_p": pp, "pairwise_r": pr, "pairwise_f": f(pp, pr),
            "bcubed_p": bp, "bcubed_r": br, "bcubed_f": f(bp, br)}
