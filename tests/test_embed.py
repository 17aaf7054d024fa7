"""`embed`: detection quality on real photos, aliases, incremental re-runs, and a run that
is killed, interrupted or raced by a second writer."""
import csv
import fcntl
import os
import re
import shutil
import signal
import warnings

import numpy as np
import pytest

import sort_faces
from conftest import (DATA, SCRIPT, labeled_photos, remove_cache, requires_data,
                      signal_mid_run, spread)

pytestmark = requires_data


def faces_by_relpath(cache, root):
    """{relpath: sorted [(rounded bbox), ...]} of every file in a cache under root."""
    out = {}
    for i, p in enumerate(cache.file_path.tolist()):
        rel = os.path.relpath(p, root)
        boxes = cache.face_bbox[cache.face_file == i]
        out[rel] = sorted(tuple(round(float(v), 1) for v in b) for b in boxes)
    return out


def run_embed(src, cache, tmp_path, *extra):
    return sort_faces.main(["embed", str(src), str(cache), "-q",
                            "--log-dir", str(tmp_path / "logs"), *extra])


def embed_quiet(src, cache):
    """embed_tree with its stats, without progress output."""
    sort_faces.CONSOLE.quiet = True
    return sort_faces.embed_tree(str(src), str(cache))


# ---------------------------------------------------------------------------- detection
def test_labeled_face_found_in_at_least_97_percent(labeled_cache):
    cache = sort_faces.load_cache(labeled_cache)
    root = DATA / "labeled"
    assert cache.n_files == len(labeled_photos())
    assert set(cache.file_status.tolist()) == {"ok"}
    found, missed = 0, []
    with open(DATA / "labeled_faces.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["labeled_face_box_x1_y1_x2_y2"].strip()]
    assert len(rows) > 250
    for r in rows:
        box = [float(v) for v in r["labeled_face_box_x1_y1_x2_y2"].split()]
        i = cache.by_path[str(root / r["relpath"])]
        best = max((sort_faces.box_iou(box, b) for b in cache.face_bbox[cache.face_file == i]),
                   default=0.0)
        if best >= sort_faces.SAME_FACE_IOU:
            found += 1
        else:
            missed.append((r["relpath"], round(best, 2)))
    assert found / len(rows) >= 0.97, f"labeled face missed in {missed}"


def test_labeled_cache_columns_are_consistent(labeled_cache):
    cache = sort_faces.load_cache(labeled_cache, pack_name="default")
    assert cache.face_emb.shape == (cache.n_faces, 512)
    norms = (cache.face_emb ** 2).sum(axis=1) ** 0.5
    assert abs(norms - 1).max() < 1e-4
    # per-file face counts agree with the faces stored
    counts = [int((cache.face_file == i).sum()) for i in range(cache.n_files)]
    assert counts == cache.file_n_faces.tolist()
    assert (cache.face_det_score >= sort_faces.DET_THRESH).all()
    assert (cache.file_width > 0).all() and (cache.file_height > 0).all()
    assert len(set(cache.file_path.tolist())) == cache.n_files
    assert cache.meta["pack"]["name"] == "default"
    assert cache.meta["roots"] == [str(DATA / "labeled")]


def test_groups_dog_has_no_face_and_t1_has_six(copy_photos, tmp_path):
    src = tmp_path / "src"
    copy_photos(src, ["dlib_dogs.jpg", "insightface_t1.jpg"], src="groups")
    assert run_embed(src, tmp_path / "c.npz", tmp_path) == 0
    cache = sort_faces.load_cache(tmp_path / "c.npz")
    n = dict(zip([os.path.basename(p) for p in cache.file_path.tolist()],
                 cache.file_n_faces.tolist()))
    assert n == {"dlib_dogs.jpg": 0, "insightface_t1.jpg": 6}
    assert set(cache.file_status.tolist()) == {"ok"}   # a photo without faces is no error


def test_a_small_photo_gets_the_upscaled_view_and_a_small_dog_still_no_face(tmp_path):
    """A 250 px portrait shows no face at native size; the detector's 640 view finds it.
    The dog, shrunk below 640 px so that it gets the same second look, stays rejected."""
    import cv2
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DATA / "calib" / "distractors" / "Mohammad_Fares_0001.jpg", src / "small.jpg")
    dog = cv2.imread(str(DATA / "groups" / "dlib_dogs.jpg"))
    cv2.imwrite(str(src / "dog.jpg"), cv2.resize(dog, (400, 400), interpolation=cv2.INTER_AREA))
    assert run_embed(src, tmp_path / "c.npz", tmp_path) == 0
    cache = sort_faces.load_cache(tmp_path / "c.npz")
    n = dict(zip([os.path.basename(p) for p in cache.file_path.tolist()],
                 cache.file_n_faces.tolist()))
    assert n == {"small.jpg": 1, "dog.jpg": 0}


# ---------------------------------------------------------------------------- incremental
def test_byte_identical_copies_become_aliases(copy_photos, tmp_path):
    src = tmp_path / "src"
    originals = copy_photos(src, 4)
    dup_same_dir = originals[0].with_name("copy of " + originals[0].name)
    dup_other_dir = src / "backup" / "old" / originals[1].name
    dup_other_dir.parent.mkdir(parents=True)
    shutil.copy2(originals[0], dup_same_dir)
    shutil.copy(originals[1], dup_other_dir)
    stats = embed_quiet(src, tmp_path / "c.npz")
    assert (stats.new, stats.aliases, stats.failed) == (4, 2, 0)
    cache = sort_faces.load_cache(tmp_path / "c.npz")
    status = dict(zip(cache.file_path.tolist(), cache.file_status.tolist()))
    sha = dict(zip(cache.file_path.tolist(), cache.file_sha256.tolist()))
    assert status[str(dup_same_dir)] == status[str(dup_other_dir)] == "alias"
    assert status[str(originals[0])] == status[str(originals[1])] == "ok"
    assert sha[str(dup_same_dir)] == sha[str(originals[0])]
    assert sha[str(dup_other_dir)] == sha[str(originals[1])]
    # faces are stored once, on the owning record; aliases report the same count
    assert {cache.file_status[f] for f in cache.face_file.tolist()} == {"ok"}
    n = dict(zip(cache.file_path.tolist(), cache.file_n_faces.tolist()))
    assert n[str(dup_same_dir)] == n[str(originals[0])] > 0
    assert cache.n_faces == sum(n[str(p)] for p in originals)
    al = cache.aliases()[sha[str(originals[0])]]
    assert al == [str(originals[0]), str(dup_same_dir)]


def test_rerun_on_unchanged_tree_hashes_nothing(copy_photos, tmp_path):
    src = tmp_path / "src"
    files = copy_photos(src, 5)
    shutil.copy2(files[0], src / "dup.jpg")
    (src / "broken.jpg").write_bytes(b"not an image")
    first = embed_quiet(src, tmp_path / "c.npz")
    assert (first.new, first.aliases, first.failed) == (5, 1, 1)
    before = sort_faces.load_cache(tmp_path / "c.npz").cols
    again = embed_quiet(src, tmp_path / "c.npz")
    assert again.hashed == 0
    assert again.unchanged == again.seen == 7
    assert (again.new, again.aliases, again.updated, again.failed) == (0, 0, 0, 0)
    after = sort_faces.load_cache(tmp_path / "c.npz").cols
    assert before.keys() == after.keys()
    for k in before:
        assert (before[k] == after[k]).all(), k
    assert not os.path.exists(str(tmp_path / "c.npz") + ".parts")


def test_new_folder_folds_into_the_same_cache(copy_photos, tmp_path):
    photos = spread(labeled_photos(), 8)
    old, new = tmp_path / "old", tmp_path / "new"
    copy_photos(old, photos[:5])
    copy_photos(new, photos[5:])
    cache_path = tmp_path / "c.npz"
    embed_quiet(old, cache_path)
    c1 = sort_faces.load_cache(cache_path)
    stats = embed_quiet(new, cache_path)
    assert (stats.seen, stats.new) == (3, 3)
    c2 = sort_faces.load_cache(cache_path)
    assert c2.n_files == 8
    assert c2.meta["roots"] == sorted([str(old), str(new)])
    for p in c1.file_path.tolist():        # the old folder's faces are untouched
        i1, i2 = c1.by_path[p], c2.by_path[p]
        assert (c1.face_emb[c1.face_file == i1] == c2.face_emb[c2.face_file == i2]).all()
        assert (c1.face_bbox[c1.face_file == i1] == c2.face_bbox[c2.face_file == i2]).all()
    added = [i for p, i in c2.by_path.items() if p.startswith(str(new) + os.sep)]
    assert len(added) == 3
    assert sum(int(c2.file_n_faces[i]) for i in added) == c2.n_faces - c1.n_faces > 0


def test_touched_file_is_rehashed_not_reembedded(copy_photos, tmp_path):
    src = tmp_path / "src"
    files = copy_photos(src, 4)
    cache_path = tmp_path / "c.npz"
    embed_quiet(src, cache_path)
    c1 = sort_faces.load_cache(cache_path)
    st = os.stat(files[2])
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    stats = embed_quiet(src, cache_path)
    assert (stats.hashed, stats.updated, stats.new, stats.unchanged) == (1, 1, 0, 3)
    c2 = sort_faces.load_cache(cache_path)
    i = c2.by_path[str(files[2])]
    assert c2.file_status[i] == "ok"
    assert int(c2.file_mtime_ns[i]) == st.st_mtime_ns + 10**9
    assert c2.n_faces == c1.n_faces
    assert (c2.face_emb == c1.face_emb).all()
    # the new mtime is remembered: the next run skips it again
    assert embed_quiet(src, cache_path).hashed == 0


def test_changed_file_content_is_reembedded(copy_photos, tmp_path):
    src = tmp_path / "src"
    files = copy_photos(src, 3)
    cache_path = tmp_path / "c.npz"
    embed_quiet(src, cache_path)
    other = DATA / "groups" / "insightface_t1.jpg"
    shutil.copy(other, files[0])              # same path, new photo with 6 faces
    stats = embed_quiet(src, cache_path)
    assert (stats.new, stats.unchanged) == (1, 2)
    c = sort_faces.load_cache(cache_path)
    assert c.n_files == 3
    assert c.file_n_faces[c.by_path[str(files[0])]] == 6


# ---------------------------------------------------------------------------- crashes
def test_sigkill_then_rerun_equals_uninterrupted_run(copy_photos, labeled_cache, tmp_path):
    photos = spread(labeled_photos(), 60)
    src = tmp_path / "src"
    copy_photos(src, photos)
    cache = tmp_path / "c.npz"
    parts = str(cache) + ".parts"

    def killed_mid_way(proc):
        return proc.returncode == -signal.SIGKILL and \
            sort_faces.load_cache(cache).n_files < 60
    signal_mid_run([SCRIPT, "embed", src, cache, "--log-dir", tmp_path / "logs",
                    "--flush-every", "5", "-q"],
                   lambda: os.path.isdir(parts) and any(n.endswith(".npz")
                                                        for n in os.listdir(parts)),
                   signal.SIGKILL, killed_mid_way, stderr_path=tmp_path / "stderr.txt",
                   reset=lambda: remove_cache(cache))
    partial = sort_faces.load_cache(cache)
    assert 5 <= partial.n_files < 60

    sort_faces.CONSOLE.quiet = True
    rerun = sort_faces.embed_tree(str(src), str(cache), flush_every=5)
    assert not rerun.interrupted and rerun.failed == 0
    # resumed: what the killed run saved is skipped, only the rest is embedded
    assert (rerun.unchanged, rerun.new) == (partial.n_files, 60 - partial.n_files)

    resumed = sort_faces.load_cache(cache)
    assert not os.path.exists(parts) or not os.listdir(parts)
    reference = sort_faces.load_cache(labeled_cache)
    want = {rel: boxes for rel, boxes in faces_by_relpath(reference, DATA / "labeled").items()
            if rel in set(photos)}
    got = faces_by_relpath(resumed, src)
    assert got == want
    assert resumed.n_files == len(set(resumed.file_path.tolist())) == 60
    pairs = [(resumed.file_path[f], tuple(resumed.face_bbox[i].round(1)))
             for i, f in enumerate(resumed.face_file)]
    assert len(pairs) == len(set(pairs))              # no face stored twice
    ref_status = {os.path.relpath(p, DATA / "labeled"): s for p, s in
                  zip(reference.file_path.tolist(), reference.file_status.tolist())}
    assert {os.path.relpath(p, src): s for p, s in zip(resumed.file_path.tolist(),
            resumed.file_status.tolist())} == {r: ref_status[r] for r in photos}


def test_second_writer_is_refused(copy_photos, tmp_path, capsys):
    src = tmp_path / "src"
    copy_photos(src, 1)
    cache = tmp_path / "c.npz"
    with open(str(cache) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242")
        lock.flush()
        capsys.readouterr()
        rc = run_embed(src, cache, tmp_path)
        err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "another sort_faces process" in lines[0] and "4242" in lines[0]
    assert not cache.exists() and not os.path.exists(str(cache) + ".parts")
    # once the lock is free the same command works
    assert run_embed(src, cache, tmp_path) == 0
    assert sort_faces.load_cache(cache).n_files == 1


def test_ctrl_c_saves_progress_and_rerun_completes(copy_photos, tmp_path):
    src = tmp_path / "src"
    copy_photos(src, 120)
    cache = tmp_path / "c.npz"
    err_path = tmp_path / "stderr.txt"
    seen = []                  # files the progress bar showed done when Ctrl-C was sent

    def fresh():
        seen.clear()
        remove_cache(cache)

    def progressed():
        done = re.findall(r"(\d+)/120", err_path.read_text(errors="replace"))
        if done and int(done[-1]) >= 1:
            seen.append(int(done[-1]))
            return True
        return False

    def interrupted_mid_way(proc):        # not: finished first, or Ctrl-C after the last file
        return proc.returncode != 0 and not (proc.returncode == 130 and os.path.exists(cache)
                                             and sort_faces.load_cache(cache).n_files == 120)
    # nothing is flushed before Ctrl-C (--flush-every 1000): what is saved, Ctrl-C saved
    proc = signal_mid_run([SCRIPT, "embed", src, cache, "--flush-every", "1000",
                           "--log-dir", tmp_path / "logs"], progressed, signal.SIGINT,
                          interrupted_mid_way, stderr_path=err_path, reset=fresh)
    assert proc.returncode == 130, proc.err
    assert "Traceback" not in proc.err
    assert "interrupted" in proc.err
    partial = sort_faces.load_cache(cache)
    assert seen[-1] <= partial.n_files < 120           # the unflushed files were saved
    assert set(partial.file_status.tolist()) == {"ok"}

    rc = sort_faces.main(["embed", str(src), str(cache), "-q", "--log-dir",
                          str(tmp_path / "logs")])
    assert rc == 0
    done = sort_faces.load_cache(cache)
    assert done.n_files == 120
    assert set(done.file_status.tolist()) == {"ok"}
    # what was saved before Ctrl-C is kept as it was
    for p in partial.file_path.tolist():
        assert (done.face_emb[done.face_file == done.by_path[p]]
                == partial.face_emb[partial.face_file == partial.by_path[p]]).all()


# ---------------------------------------------------------------------------- --device
def _has_cuda():
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="this machine has a CUDA onnxruntime")
def test_device_cuda_without_a_gpu_is_one_error_line(copy_photos, tmp_path, capsys):
    src = tmp_path / "src"
    copy_photos(src, ["insightface_t1.jpg"], src="groups")
    rc = sort_faces.main(["embed", str(src), str(tmp_path / "c.npz"), "-q", "--device", "cuda",
                          "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: --device cuda:")
    assert "onnxruntime-gpu" in err[0]
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.skipif(not _has_cuda(), reason="no CUDA onnxruntime (onnxruntime-gpu) here")
def test_gpu_and_cpu_embeddings_agree(copy_photos, tmp_path):
    """Same photos on both devices: every face found on both, cosine >= 0.999 per face."""
    src = tmp_path / "src"
    copy_photos(src, spread(labeled_photos(), 40))
    caches = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.npz"
        assert sort_faces.main(["embed", str(src), str(path), "-q", "--device", device,
                                "--log-dir", str(tmp_path / "logs")]) == 0
        caches[device] = sort_faces.load_cache(path)
    cpu, gpu = caches["cpu"], caches["cuda"]
    assert cpu.n_faces == gpu.n_faces
    assert (np.sum(cpu.face_emb * gpu.face_emb, axis=1) >= 0.999).all()


# ---------------------------------------------------------------------------- the recognizer
def test_the_rewritten_recognizer_equals_the_shipped_one(labeled_cache):
    """embed runs the recognizer with PRelu written as a*x + (1-a)*Relu(x) (faster on the
    CPU): the same embeddings as the shipped file run as it is, and the cache still names
    the shipped files."""
    import cv2
    import onnxruntime as ort
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils import face_align
    pack = sort_faces.locate_pack("default")
    models = sort_faces.load_models(pack, threads=1, device="cpu")
    shipped = ArcFaceONNX(model_file=pack.files["rec"], session=ort.InferenceSession(
        pack.files["rec"], providers=["CPUExecutionProvider"]))
    with open(pack.files["rec"], "rb") as f:
        assert b"PRelu" in f.read()                       # the file on disk is as shipped
    assert "PRelu" not in {n.op_type for n in __import__("onnx").load_from_string(
        sort_faces.prelu_free(pack.files["rec"])).graph.node}
    crops = []
    for rel in spread(labeled_photos(), 40):
        img = cv2.imread(str(DATA / "labeled" / rel))
        _, kps, _ = sort_faces.detect_faces(models["det"], img)
        crops += [face_align.norm_crop(img, k) for k in kps]
    assert len(crops) >= 40
    a, b = shipped.get_feat(crops), models["rec"].get_feat(crops)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99999, cos.min()
    cache = sort_faces.load_cache(labeled_cache)
    assert cache.meta["pack"] == pack.identity()


def test_faces_are_aligned_as_insightface_aligns_them_and_bad_keypoints_give_no_face():
    """aligned_face() (the recognizer's 112 px crop, fitted without scikit-image) is
    insightface's face_align.norm_crop bit for bit on real faces, upright or turned; the
    keypoints of no face (all alike, not finite, absurd: a damaged cache's) give a black
    crop, never an exception."""
    import cv2
    from insightface.utils import face_align
    models = sort_faces.load_models(sort_faces.locate_pack("default"), threads=1, device="cpu")
    faces = 0
    for rel in spread(labeled_photos(), 30) + ["../groups/insightface_t1.jpg"]:
        img = cv2.imread(str(DATA / "labeled" / rel))
        for q in (0, 1):
            turned = np.ascontiguousarray(np.rot90(img, q))
            _, kps, _ = sort_faces.detect_faces(models["det"], turned)
            for k in kps:
                assert np.array_equal(sort_faces.aligned_face(turned, k),
                                      face_align.norm_crop(turned, k)), rel
                faces += 1
    assert faces >= 40
    img = cv2.imread(str(DATA / "groups" / "insightface_t1.jpg"))
    hostile = [np.zeros((5, 2)), np.full((5, 2), np.nan), np.full((5, 2), 1e30),
               np.float32([[0, 0], [3e38, 0], [0, 3e38], [1, 1], [2, 2]]),
               np.float32([[3e38, 0]] * 5), np.full((5, 2), 1e39), np.zeros((4, 2)),
               np.zeros((5, 3)), 100 + 1e-30 * np.arange(10.0).reshape(5, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in hostile:
            crop = sort_faces.aligned_face(img, k)
            assert crop.shape == (112, 112, 3) and not crop.any(), k


def test_embed_starts_without_insightface_app_and_leaves_insightface_whole(tmp_path,
                                                                          copy_photos):
    """An embed process imports only the insightface modules it runs (its app, liveness
    addon, scipy and requests were 0.3 s of every start); enrich after it in the same
    process, and code that imports insightface there, still find the whole package."""
    import json
    import subprocess
    import sys
    src = tmp_path / "src"
    copy_photos(src, ["insightface_t1.jpg"], src="groups")
    probe = f"""
import json, sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
import sort_faces
code = sort_faces.main(["embed", {str(src)!r}, {str(tmp_path / "c.npz")!r}, "-q",
                        "--log-dir", {str(tmp_path / "logs")!r}])
loaded = {{m: m in sys.modules for m in ("scipy", "requests", "insightface.app",
                                          "insightface.addons")}}
lmk = sort_faces.load_models(sort_faces.locate_pack("default", roles=("lmk2d",)))["lmk2d"]
code = code or sort_faces.main(["enrich", {str(tmp_path / "c.npz")!r}, "-q",
                                "--log-dir", {str(tmp_path / "logs")!r}])
import insightface
import insightface.model_zoo as zoo
from insightface.utils import download
whole = [hasattr(insightface, "app"), hasattr(insightface, "data"),
         hasattr(zoo, "model_zoo"), callable(zoo.get_model), callable(download),
         type(download).__name__ != "module", callable(zoo.SCRFD)]
from insightface.app import FaceAnalysis
print(json.dumps([code, loaded, insightface.__version__, whole + [lmk.taskname == "landmark_2d_106"],
                  FaceAnalysis.__name__]))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    code, loaded, version, whole, app = json.loads(out.stdout.strip().splitlines()[-1])
    assert code == 0
    assert not any(loaded.values()), loaded
    assert version and all(whole) and app == "FaceAnalysis", whole
    assert sort_faces.load_cache(tmp_path / "c.npz").n_faces == 6


def test_shrink_averages_like_inter_area_and_keeps_geometry():
    """shrink() (the fast reduction behind thumbnails and crops) stays within a few
    grey levels of OpenCV's INTER_AREA on a real photo, on average, and maps pixels as
    cv2.resize does: a bright spot lands where INTER_AREA puts it."""
    import cv2
    photo = cv2.imread(str(DATA / "groups" / "wikimedia_Modi_with_Obama.jpg"))
    for size in ((640, 427), (97, 61), (32, 32)):
        want = cv2.resize(photo, size, interpolation=cv2.INTER_AREA).astype(float)
        got = sort_faces.shrink(photo, *size)
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 4.0, size
    spot = np.zeros((1500, 2000), np.uint8)
    spot[1190:1200, 1610:1620] = 255
    for size in ((640, 480), (200, 150)):
        want = cv2.resize(spot, size, interpolation=cv2.INTER_AREA).astype(float)
        got = sort_faces.shrink(spot, *size).astype(float)
        centre = lambda a: np.array([(a.sum(0) * np.arange(a.shape[1])).sum(),
                                     (a.sum(1) * np.arange(a.shape[0])).sum()]) / a.sum()
        assert np.abs(centre(got) - centre(want)).max() < 0.05, size


def test_thumbnails_from_the_detector_view_match_the_photos_and_thin_photos_get_one():
    """A review thumbnail cut from the detector's view looks like the one cut from the
    decoded photo (landscape and portrait), a view no smaller means the photo's own, and a photo
    one or two pixels wide still gets a thumbnail (it used to recurse without end)."""
    import cv2
    face = cv2.imread(str(sorted((DATA / "labeled").glob("*/*.jpg"))[0]))
    rel = np.array([[0.35, 0.40], [0.65, 0.40], [0.50, 0.55], [0.38, 0.70], [0.62, 0.70]])
    thumb = lambda jpeg: cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    for W, H in ((4032, 3024), (3024, 4032)):
        bgr = np.full((H, W, 3), 90, np.uint8)
        side = min(W, H) // 2
        x0, y0 = (W - side) // 2, H - side - 5          # near an edge: a wrong scale shows
        bgr[y0:y0 + side, x0:x0 + side] = cv2.resize(face, (side, side),
                                                     interpolation=cv2.INTER_CUBIC)
        box = np.array([x0, y0, x0 + side, y0 + side], np.float32) + \
            np.array([0.2, 0.2, -0.2, -0.2], np.float32) * side
        kps = (np.array([x0, y0]) + rel * side).astype(np.float32)
        view = sort_faces.detector_view(bgr)
        want = thumb(sort_faces.face_thumb(bgr, box, kps)).astype(float)
        got = thumb(sort_faces.face_thumb(bgr, box, kps, view)).astype(float)
        assert got.shape == want.shape == (sort_faces.THUMB_PX, sort_faces.THUMB_PX, 3)
        # two routes of reduction differ by a few grey levels (sharpness), never in place:
        # the best match of the two is unshifted
        shifts = {(dy, dx): np.abs(got[4 + dy:108 + dy, 4 + dx:108 + dx]
                                   - want[4:108, 4:108]).mean()
                  for dy in range(-2, 3) for dx in range(-2, 3)}
        assert shifts[0, 0] < 6.0 and min(shifts, key=shifts.get) == (0, 0), (W, H)
        assert sort_faces.face_thumb(bgr, box, kps, bgr) == \
            sort_faces.face_thumb(bgr, box, kps)
    for h, w in ((300, 1), (1, 300), (9000, 2)):
        thin = np.full((h, w, 3), 128, np.uint8)
        box = np.array([0, 0, w, h], np.float32)
        kps = (rel * [w, h]).astype(np.float32)
        view = sort_faces.detector_view(thin)
        assert thumb(sort_faces.face_thumb(thin, box, kps, view)).shape[:2] == \
            (sort_faces.THUMB_PX, sort_faces.THUMB_PX)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpegs_decode_as_pil_decodes_them(orientation):
    """decode_image's JPEG path (OpenCV) gives exactly PIL's pixels: full size and reduced
    by the DCT, every EXIF orientation, colour and grey; a truncated JPEG is still refused."""
    import io
    from PIL import Image, ImageOps
    photo = Image.open(DATA / "groups" / "wikimedia_Modi_with_Obama.jpg").convert("RGB")
    big = photo.resize((photo.width * 4, photo.height * 4), Image.BICUBIC)
    for im, min_side in ((photo, None), (big, 1280), (photo.convert("L"), None),
                         (big.convert("L"), 1280)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90, exif=exif)
        data = buf.getvalue()
        want = Image.open(io.BytesIO(data))
        if min_side:
            r = min_side / max(want.size)
            want.draft("RGB", (int(want.size[0] * r) + 1, int(want.size[1] * r) + 1))
        want = np.asarray(ImageOps.exif_transpose(want).convert("RGB"))[:, :, ::-1]
        got = sort_faces.decode_image(data, min_side)
        assert got.bgr.shape == want.shape and np.array_equal(got.bgr, want), (im.mode, min_side)
        assert (got.width, got.height) == ImageOps.exif_transpose(Image.open(
            io.BytesIO(data))).size
    with pytest.raises(sort_faces.BadFile, match="truncated"):
        sort_faces.decode_image(data[:len(data) * 2 // 3], None)


def test_phone_jpegs_take_the_fast_decode_and_keep_their_turn():
    """What phone JPEGs hold besides the picture (an EXIF thumbnail, which is a JPEG of its
    own; a trailer after the end marker; an orientation given only in XMP, or in a second
    EXIF block) neither sends them to the slow decode nor changes the pixels: PIL's,
    turned as PIL turns them."""
    import io
    import struct
    from PIL import Image, ImageOps
    photo = Image.open(DATA / "groups" / "wikimedia_Modi_with_Obama.jpg").convert("RGB")
    thumb = io.BytesIO()
    photo.resize((160, 117)).save(thumb, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90, exif=exif)
    plain = buf.getvalue()
    app1 = lambda payload: b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    xmp = b'http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><rdf:Description tiff:Orientation="3"/>' \
        b"</x:xmpmeta>"
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    bare = buf.getvalue()
    mpo = io.BytesIO()
    photo.save(mpo, "MPO", save_all=True, append_images=[photo.rotate(90)], exif=exif)
    variants = {
        "mpo (a phone's motion or HDR photo)": mpo.getvalue(),
        "exif thumbnail": plain[:2] + app1(b"Exif\0\0" + thumb.getvalue()) + plain[2:],
        "trailer": plain + b"MotionPhoto_Data" + bytes(range(256)) * 4,
        "xmp only": bare[:2] + app1(xmp) + bare[2:],
        "second exif": plain[:2] + app1(b"Exif\0\0" + exif.tobytes()) + plain[2:],
    }
    for name, data in variants.items():
        assert sort_faces._jpeg_whole(data), name
        opened = Image.open(io.BytesIO(data))
        assert opened.format == ("MPO" if name.startswith("mpo") else "JPEG"), name
        want = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
        got = sort_faces.decode_image(data)
        assert np.array_equal(got.bgr, want[:, :, ::-1]), name
