"""`enrich` on real photos: landmarks inside their face, a head pose that flips with a
mirror image and is small on LFW news photos, resume after SIGKILL, a re-run that does
nothing, sources that vanished or changed since embed, and export-swap refusing a cache
that was never enriched."""
import csv
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import DATA, SCRIPT, requires_data, signal_mid_run
import sort_faces

pytestmark = requires_data


def run(tmp, capsys, *args):
    """sort_faces.main in-process: (exit status, stdout lines, stderr lines)."""
    capsys.readouterr()
    rc = sort_faces.main([*map(str, args), "-q", "--log-dir", str(tmp / "logs")])
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err.strip().splitlines()


def ok(tmp, capsys, *args):
    rc, out, err = run(tmp, capsys, *args)
    assert rc == 0, err
    return out, err


def warnings_by_path(lines):
    """{path: reason} of `warning: <path>: <reason>` lines (no ': ' in our tmp paths)."""
    out = {}
    for line in lines:
        if line.startswith("warning: "):
            path, _, reason = line[len("warning: "):].partition(": ")
            assert path not in out, f"two warnings for {path}"
            out[path] = reason
    return out


@pytest.fixture(scope="module")
def enriched_labeled(labeled_cache, tmp_path_factory):
    """A copy of the session's labeled cache, enriched."""
    tmp = tmp_path_factory.mktemp("enriched_labeled")
    cache = tmp / "labeled.npz"
    shutil.copy(labeled_cache, cache)
    assert sort_faces.main(["enrich", str(cache), "-q", "--log-dir", str(tmp / "logs")]) == 0
    return sort_faces.load_cache(cache)


# ---------------------------------------------------------------------------- landmarks
def test_landmarks_fall_inside_the_face_box(enriched_labeled):
    c = enriched_labeled
    assert c.n_faces >= 290
    # default pack: solvePnP on the 2D landmarks for every face, no 3D landmark model
    assert (c.face_pose_method == 2).all()
    assert not c.face_lmk68.any()
    assert np.isfinite(c.face_lmk106).all() and np.isfinite(c.face_pose).all()
    x1, y1, x2, y2 = c.face_bbox.T
    w, h = x2 - x1, y2 - y1
    m = 0.25                                           # the box enlarged by 25% on each side
    lx, ly = c.face_lmk106[:, :, 0], c.face_lmk106[:, :, 1]
    inside = ((lx >= (x1 - m * w)[:, None]) & (lx <= (x2 + m * w)[:, None])
              & (ly >= (y1 - m * h)[:, None]) & (ly <= (y2 + m * h)[:, None]))
    bad = [(str(c.file_path[c.face_file[i]]), c.face_bbox[i].round(1).tolist())
           for i in np.flatnonzero(~inside.all(axis=1))]
    assert not bad, bad
    # and they spread over the face, not collapse onto a point
    spread = np.ptp(c.face_lmk106, axis=1)              # (n, 2): landmark cloud width, height
    assert (spread[:, 0] > 0.4 * w).all() and (spread[:, 1] > 0.4 * h).all()


def test_median_yaw_of_lfw_photos_is_small(enriched_labeled):
    """LFW news photos are mostly near-frontal: median |yaw| of their labeled face < 20
    degrees (measured 16)."""
    c = enriched_labeled
    with open(DATA / "labeled.csv", newline="") as f:
        lfw = {r["relpath"] for r in csv.DictReader(f) if "lfw" in r["source_path"]}
    with open(DATA / "labeled_faces.csv", newline="") as f:
        boxes = {r["relpath"]: [float(v) for v in r["labeled_face_box_x1_y1_x2_y2"].split()]
                 for r in csv.DictReader(f) if r["labeled_face_box_x1_y1_x2_y2"].strip()}
    yaws = []
    for i in range(c.n_faces):
        rel = os.path.relpath(str(c.file_path[c.face_file[i]]), DATA / "labeled")
        if rel in lfw and rel in boxes \
                and sort_faces.box_iou(c.face_bbox[i], boxes[rel]) >= sort_faces.SAME_FACE_IOU:
            yaws.append(float(c.face_pose[i, 1]))
    assert len(yaws) >= 100, len(yaws)                  # 115 LFW photos
    assert np.median(np.abs(yaws)) < 20, np.median(np.abs(yaws))


# ---------------------------------------------------------------------------- mirror
#: Single-face photos from the three sources (5-celebrity, LFW, dlib crops) with a clear
#: turn of the head; the README: yaw > 0 when the face turns towards the image's left
#: (Madonna_0002 does, Ben_Affleck_0012 turns right).
MIRRORED = {"Madonna/Madonna_0002.jpg": +1, "Ben_Affleck/Ben_Affleck_0012.jpg": -1,
            "Hugo_Chavez/Hugo_Chavez_0026.jpg": 0,
            "John_Shimkus/John_Shimkus_000383_03227939.jpg": 0}


def test_mirrored_photo_gets_opposite_yaw(copy_photos, tmp_path, capsys):
    src = tmp_path / "src"
    originals = copy_photos(src, list(MIRRORED))
    for p in originals:                    # lossless PNG: only the mirror differs
        dst = src / "mirrored" / p.parent.name / (p.stem + ".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(Image.open(p).convert("RGB")).save(dst)
    cache = tmp_path / "c.npz"
    ok(tmp_path, capsys, "embed", src, cache)
    ok(tmp_path, capsys, "enrich", cache)
    c = sort_faces.load_cache(cache)
    assert (c.face_pose_method == 2).all()
    checked = 0
    for rel, sign in MIRRORED.items():
        f = c.by_path[str(src / rel)]
        person, name = rel.split("/")
        g = c.by_path[str(src / "mirrored" / person / (name[:-4] + ".png"))]
        W = float(c.file_width[f])
        assert c.file_width[g] == W and c.file_n_faces[f] == c.file_n_faces[g] >= 1
        mine, theirs = np.flatnonzero(c.face_file == f), np.flatnonzero(c.face_file == g)
        for i in mine:
            x1, y1, x2, y2 = c.face_bbox[i]
            flipped = [W - x2, y1, W - x1, y2]
            j = max(theirs, key=lambda j: sort_faces.box_iou(flipped, c.face_bbox[j]))
            assert sort_faces.box_iou(flipped, c.face_bbox[j]) >= 0.7, \
                (rel, c.face_bbox[i], c.face_bbox[j])
            (pitch, yaw, _), (pitch_m, yaw_m, _) = c.face_pose[i], c.face_pose[j]
            if sign:
                assert sign * yaw > 10 and sign * yaw_m < -10, (rel, yaw, yaw_m)
            if abs(yaw) >= 5:
                checked += 1
                assert abs(yaw + yaw_m) <= 5, (rel, yaw, yaw_m)
                assert abs(pitch - pitch_m) <= 5, (rel, pitch, pitch_m)
    assert checked >= 4


# ---------------------------------------------------------------------------- resume
def test_resume_after_sigkill_equals_an_uninterrupted_run(copy_photos, tmp_path, capsys):
    src = tmp_path / "src"
    copy_photos(src, 40)
    killed, clean = tmp_path / "killed.npz", tmp_path / "clean.npz"
    ok(tmp_path, capsys, "embed", src, killed)
    shutil.copy(killed, clean)
    n = sort_faces.load_cache(killed).n_faces
    assert n >= 40

    parts = str(killed) + ".parts"

    def killed_mid_way(proc):
        left = sort_faces.load_cache(killed)
        return proc.returncode == -signal.SIGKILL and (left.face_pose_method == 0).any()
    signal_mid_run([SCRIPT, "enrich", killed, "--flush-every", "3", "-q",
                    "--log-dir", tmp_path / "logs"],
                   lambda: os.path.isdir(parts) and any(p.endswith(".npz")
                                                        for p in os.listdir(parts)),
                   signal.SIGKILL, killed_mid_way, stderr_path=tmp_path / "stderr.txt",
                   reset=lambda: (shutil.rmtree(parts, ignore_errors=True),
                                  shutil.copy(clean, killed)))
    partial = sort_faces.load_cache(killed)
    done = int((partial.face_pose_method != 0).sum())
    assert 3 <= done < n, (done, n)                     # what the killed run saved

    sort_faces.CONSOLE.quiet = True
    stats = sort_faces.enrich_cache(str(killed), flush_every=3)
    assert not stats.interrupted and stats.failed == 0
    assert (stats.skipped, stats.faces) == (done, n - done)    # resumed, nothing redone
    ok(tmp_path, capsys, "enrich", clean)

    a, b = sort_faces.load_cache(killed), sort_faces.load_cache(clean)
    leftover = os.listdir(parts) if os.path.isdir(parts) else []
    assert not [p for p in leftover if p.endswith(".npz")], leftover   # all folded in
    assert a.file_path.tolist() == b.file_path.tolist()
    assert np.array_equal(a.face_bbox, b.face_bbox)
    assert (a.face_pose_method == 2).all() and np.array_equal(a.face_pose_method,
                                                              b.face_pose_method)
    assert np.allclose(a.face_lmk106, b.face_lmk106, atol=1e-3)
    assert np.allclose(a.face_pose, b.face_pose, atol=1e-3)
    assert np.array_equal(a.face_emb, b.face_emb)       # enrich never touches embeddings


def test_rerun_does_nothing(copy_photos, tmp_path, capsys):
    src = tmp_path / "src"
    copy_photos(src, 5)
    cache = tmp_path / "c.npz"
    ok(tmp_path, capsys, "embed", src, cache)
    out, _ = ok(tmp_path, capsys, "enrich", cache)
    n = sort_faces.load_cache(cache).n_faces
    assert out[-1].startswith(f"enrich: {n} faces in ")
    before, mtime = cache.read_bytes(), cache.stat().st_mtime_ns

    out, err = ok(tmp_path, capsys, "enrich", cache)
    assert out[-1].startswith(f"enrich: 0 faces in 0 photos given landmarks and pose, "
                              f"{n} already done, 0 photos failed"), out
    assert not err
    assert cache.read_bytes() == before and cache.stat().st_mtime_ns == mtime
    assert not os.path.exists(str(cache) + ".parts")


# ---------------------------------------------------------------------------- bad sources
def test_vanished_and_changed_sources_are_reported_and_recorded(copy_photos, tmp_path,
                                                                 capsys):
    src = tmp_path / "src"
    files = copy_photos(src, 6)
    cache = tmp_path / "c.npz"
    ok(tmp_path, capsys, "embed", src, cache)
    gone, changed = files[0], files[1]
    gone.unlink()
    shutil.copy(DATA / "groups" / "insightface_t1.jpg", changed)   # another photo, same path

    rc, out, err = run(tmp_path, capsys, "enrich", cache)
    assert rc == 0, err
    warned = warnings_by_path(err)
    assert set(warned) == {str(gone), str(changed)}, err
    assert all(line.startswith("warning: ") for line in err), err      # one line each
    assert "unreadable" in warned[str(gone)] or "vanished" in warned[str(gone)]
    assert "changed since embed" in warned[str(changed)]
    assert "2 photos failed" in out[-1]

    c = sort_faces.load_cache(cache)
    for f, path in enumerate(c.file_path.tolist()):
        faces = c.face_file == f
        if path in warned:
            assert c.file_enrich_error[f] == warned[path]
            assert (c.face_pose_method[faces] == 0).all()   # nothing made up for them
        else:
            assert c.file_enrich_error[f] == ""
            assert (c.face_pose_method[faces] == 2).all()
    assert (c.face_pose_method == 2).sum() >= 4


# ---------------------------------------------------------------------------- export-swap
def test_export_swap_without_enrich_says_to_run_enrich(labeled_cache, tmp_path, capsys):
    ref = tmp_path / "ref"
    ok(tmp_path, capsys, "refine", labeled_cache, ref, "--min-short", "40", "--min-faces", "6")
    assert sort_faces.load_cache(labeled_cache).face_pose_method.max() == 0
    rc, out, err = run(tmp_path, capsys, "export-swap", labeled_cache,
                       ref / "refine_manifest.json", tmp_path / "swap", "--min-face-short", "40")
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error:") and "enrich" in err[0], err
    assert f"sort_faces.py enrich {labeled_cache}" in err[0]
    assert not out
    assert not list(tmp_path.glob("swap/**/*.png")) and not list(tmp_path.glob("swap/**/*.fsz"))
