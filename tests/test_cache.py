"""The cache: merging part files, the writer's lock and crash windows, and refusing a
cache made by another pack or another format version."""
import os
import shutil

import numpy as np
import pytest

import sort_faces
from sort_faces import CACHE_FORMAT, PACKS, merge_columns


def chunk(files, faces=()):
    """Cache columns from files [(path, sha256, status)] and faces [(file index, tag)];
    a face's tag is stored as its detector score so tests can tell faces apart."""
    cols = {}
    for k, empty in sort_faces._empty_columns().items():   # every column, zero-filled
        n = len(files) if k.startswith("file_") else len(faces)
        cols[k] = np.zeros((n,) + empty.shape[1:], empty.dtype)
    if files:
        cols["file_path"] = np.array([f[0] for f in files], str)
        cols["file_sha256"] = np.array([f[1] for f in files], str)
        cols["file_status"] = np.array([f[2] for f in files], str)
        cols["file_error"] = np.array(["broken" if f[2] == "error" else "" for f in files],
                                      str)
    if faces:
        n = len(faces)
        rng = np.random.default_rng(len(files) * 100 + n)
        emb = rng.normal(size=(n, 512)).astype(np.float32)
        cols["face_emb"] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        cols["face_file"] = np.array([f for f, _ in faces], np.int64)
        cols["face_det_score"] = np.array([t for _, t in faces], np.float32)
        cols["face_bbox"] = np.tile(np.array([[1, 2, 30, 40]], np.float32), (n, 1))
    return cols


def view(cols):
    """{path: (status, n_faces, sorted face tags)}."""
    out = {}
    for i, (p, st, n) in enumerate(zip(cols["file_path"].tolist(), cols["file_status"].tolist(),
                                       cols["file_n_faces"].tolist())):
        tags = sorted(round(float(t), 3) for t in cols["face_det_score"][cols["face_file"] == i])
        out[p] = (st, n, tags)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and (a[k] == b[k]).all(), k


# A history: a.jpg embedded (2 faces), b.jpg a copy of it, c.jpg embedded (1 face);
# then a.jpg is replaced by another photo (1 face) and c.jpg becomes unreadable.
FIRST = chunk([("a.jpg", "A", "ok"), ("b.jpg", "A", "alias"), ("c.jpg", "C", "ok")],
              [(0, 0.71), (0, 0.72), (2, 0.73)])
SECOND = chunk([("a.jpg", "A2", "ok"), ("c.jpg", "", "error")], [(0, 0.81)])


def test_merge_last_record_of_a_path_wins():
    merged = view(merge_columns([FIRST, SECOND]))
    assert list(merged) == ["a.jpg", "b.jpg", "c.jpg"]      # first-seen order kept
    assert merged["a.jpg"] == ("ok", 1, [0.81])
    assert merged["c.jpg"] == ("error", 0, [])
    # b.jpg still holds a.jpg's old content: it now owns those faces
    assert merged["b.jpg"] == ("ok", 2, [0.71, 0.72])


def test_merge_first_ok_record_of_a_content_owns_its_faces():
    # the same bytes embedded twice (two paths, or a replayed part): faces kept once
    again = chunk([("d.jpg", "A", "ok")], [(0, 0.91), (0, 0.92)])
    merged = view(merge_columns([FIRST, again]))
    assert merged["a.jpg"] == ("ok", 2, [0.71, 0.72])
    assert merged["d.jpg"] == ("alias", 2, [])
    assert merged["b.jpg"] == ("alias", 2, [])
    assert sum(len(tags) for _, _, tags in merged.values()) == 3


def test_merge_is_idempotent_and_parts_can_be_replayed():
    once = merge_columns([FIRST, SECOND])
    assert_same(merge_columns([once]), once)
    # a crash after the consolidated cache is written but before its parts are
    # deleted replays the parts on top of it: same result
    assert_same(merge_columns([once, FIRST, SECOND]), once)
    assert_same(merge_columns([once, SECOND]), once)
    assert_same(merge_columns([FIRST, SECOND, SECOND]), once)


def test_merge_of_nothing_is_an_empty_cache():
    empty = merge_columns([])
    assert set(empty) == set(sort_faces._empty_columns())
    assert all(len(v) == 0 for v in empty.values())
    assert_same(merge_columns([chunk([])]), empty)


def faces(n, tag):
    f = chunk([("x", "X", "ok")], [(0, tag)] * n)
    return sort_faces.Faces(f["face_emb"], f["face_bbox"], f["face_kps"],
                            f["face_det_score"], f["face_short"], f["face_blur"],
                            f["face_phash"], f["face_phash_flip"])


@pytest.fixture(scope="module")
def pack():
    return sort_faces.locate_pack("default")


def test_writer_parts_survive_a_crash_and_consolidate(tmp_path, pack):
    path = tmp_path / "c.npz"
    w = sort_faces.CacheWriter(str(path), pack, [str(tmp_path)])
    try:
        for i in range(7):
            w.add(f"/p/{i}.jpg", sha256=f"S{i}", size=i, mtime_ns=i, faces=faces(i % 3, i / 10))
            if i % 3 == 2:
                w.flush()
        w.add("/p/dup.jpg", sha256="S1", status="alias")
        w.flush()
        parts = sorted(os.listdir(str(path) + ".parts"))
        assert len(parts) == 3 and not path.exists()
        # what a SIGKILL leaves behind (parts only) already loads as the cache
        crashed = sort_faces.load_cache(path)
        assert crashed.n_files == 8 and crashed.n_faces == sum(i % 3 for i in range(7))
        saved = tmp_path / "saved_parts"
        shutil.copytree(str(path) + ".parts", saved)
        w.consolidate()
    finally:
        w.close()
    assert path.exists() and not os.path.exists(str(path) + ".parts")
    done = sort_faces.load_cache(path)
    assert_same(done.cols, crashed.cols)
    assert done.file_status[done.by_path["/p/dup.jpg"]] == "alias"
    # crash between writing CACHE and removing its parts: they merge idempotently
    shutil.copytree(saved, str(path) + ".parts")
    assert_same(sort_faces.load_cache(path).cols, done.cols)


def test_writer_lock_refuses_a_second_writer(tmp_path, pack):
    path = str(tmp_path / "c.npz")
    first = sort_faces.CacheWriter(path, pack, [str(tmp_path)])
    try:
        with pytest.raises(sort_faces.SortFacesError, match="another sort_faces process"):
            sort_faces.CacheWriter(path, pack, [str(tmp_path)])
    finally:
        first.close()
    sort_faces.CacheWriter(path, pack, [str(tmp_path)]).close()   # free again


def test_a_refused_cache_is_not_left_locked(tmp_path, pack):
    path = tmp_path / "c.npz"
    write_foreign_cache(path, "default", fmt=CACHE_FORMAT + 98)
    with pytest.raises(sort_faces.SortFacesError, match="format") as refused:
        sort_faces.CacheWriter(str(path), pack, [str(tmp_path)])
    # while the caller still holds the error, the cache is free again (a script that
    # catches it and retries must not be told another process is writing)
    assert refused.value and not os.path.exists(str(path) + ".lock")   # released, removed
    with pytest.raises(sort_faces.SortFacesError, match="format"):     # not "another process"
        sort_faces.CacheWriter(str(path), pack, [str(tmp_path)])


def write_foreign_cache(path, pack_name="buffalo_l", fmt=CACHE_FORMAT, rec_sha=None):
    files = PACKS[pack_name]["files"]
    meta = {"format": fmt, "tool_version": sort_faces.__version__, "roots": [],
            "pack": {"name": pack_name, "embedding_size": 512,
                     "det_sha256": files["det"][1],
                     "rec_sha256": rec_sha or files["rec"][1]}}
    sort_faces._write_npz(str(path), meta, sort_faces._empty_columns())
    return path.read_bytes()


def run(tmp_path, capsys, *argv):
    capsys.readouterr()
    rc = sort_faces.main([*map(str, argv), "-q", "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.fixture
def src(tmp_path):
    """A source tree with nothing in it: a refusal must come before any scanning."""
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


def test_embed_refuses_a_cache_of_another_pack(tmp_path, capsys, src):
    cache = tmp_path / "c.npz"
    before = write_foreign_cache(cache)
    rc, err = run(tmp_path, capsys, "embed", src, cache)
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error:") and "'buffalo_l'" in err[0], err
    assert "--pack buffalo_l" in err[0]
    assert cache.read_bytes() == before
    assert not os.path.exists(str(cache) + ".parts")


def test_embed_refuses_a_cache_of_other_model_files(tmp_path, capsys, src):
    cache = tmp_path / "c.npz"
    before = write_foreign_cache(cache, "default", rec_sha="0" * 64)
    rc, err = run(tmp_path, capsys, "embed", src, cache)
    assert rc == 1
    assert len(err) == 1 and "different model files" in err[0], err
    assert cache.read_bytes() == before


def test_cluster_refuses_a_cache_of_another_pack(tmp_path, capsys):
    cache = tmp_path / "c.npz"
    write_foreign_cache(cache)
    rc, err = run(tmp_path, capsys, "cluster", cache, tmp_path / "out", "--pack", "default")
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error:") and "'buffalo_l'" in err[0], err
    assert not (tmp_path / "out").exists()


def test_cache_of_another_format_version_is_refused(tmp_path, capsys, src):
    cache = tmp_path / "c.npz"
    before = write_foreign_cache(cache, "default", fmt=CACHE_FORMAT + 98)
    for argv in (["embed", src, cache], ["cluster", cache, tmp_path / "out"]):
        rc, err = run(tmp_path, capsys, *argv)
        assert rc == 1
        assert len(err) == 1 and err[0].startswith("error:"), err
        assert f"format {CACHE_FORMAT + 98}" in err[0] and f"format {CACHE_FORMAT}" in err[0]
    assert cache.read_bytes() == before


def test_missing_or_garbage_cache_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    with pytest.raises(sort_faces.SortFacesError, match="cache not found"):
        sort_faces.load_cache(missing)
    assert sort_faces.load_cache(missing, must_exist=False) is None
    rc, err = run(tmp_path, capsys, "cluster", missing, tmp_path / "out")
    assert rc == 1 and len(err) == 1 and str(missing) in err[0] and "not found" in err[0]
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is no zip")
    rc, err = run(tmp_path, capsys, "cluster", garbage, tmp_path / "out")
    assert rc == 1 and len(err) == 1 and "not a sort_faces cache" in err[0], err


@pytest.mark.parametrize("box", [(300, 300, 620, 620), (40, 500, 140, 610), (800, -30, 950, 120)])
def test_hide_faces_blurs_the_face_where_it_is(box):
    """The blur that hides another face in a crop is centred on that face, whatever its
    size and however far it reaches past the crop, and leaves the rest of the crop alone."""
    img = np.indices((900, 900)).sum(0) % 2 * 255                 # a 1 px checkerboard
    img = np.repeat(img[..., None], 3, 2).astype(np.uint8)
    out = sort_faces.hide_faces(img, [box])
    assert out.shape == img.shape and out.dtype == np.uint8
    changed = np.abs(out.astype(int) - img).sum(2) > 60
    ys, xs = np.nonzero(changed)
    x1, y1, x2, y2 = (float(v) for v in box)
    face = max(x2 - x1, y2 - y1)
    # where the blur should be: the ellipse around the face, as much of it as is in the crop
    gy, gx = np.indices(changed.shape)
    inside = (((gx - (x1 + x2) / 2) / (0.6 * (x2 - x1) + 2)) ** 2
              + ((gy - (y1 + y2) / 2) / (0.6 * (y2 - y1) + 2)) ** 2) <= 1
    wy, wx = np.nonzero(inside)
    assert abs(xs.mean() - wx.mean()) < 0.05 * face and abs(ys.mean() - wy.mean()) < 0.05 * face, \
        (xs.mean(), ys.mean(), wx.mean(), wy.mean())
    far = ((gx - (x1 + x2) / 2) ** 2 + (gy - (y1 + y2) / 2) ** 2) > (1.2 * face) ** 2
    assert not (changed & far).any()             # the rest of the crop is left alone
