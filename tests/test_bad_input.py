"""`embed` on a tree full of broken, odd and hostile files: every bad file is one warning
line and an 'error' record, every usable photo is embedded, and the source is untouched."""
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import sort_faces
from conftest import DATA, HANG_GUARD_S, ROOT, SCRIPT, requires_data

pytestmark = requires_data

L = DATA / "labeled"
PHOTOS = {   # real photos, each a different person, each with one labeled face
    "plain": L / "Tony_Blair" / "Tony_Blair_0017.jpg",
    "cmyk": L / "Hugo_Chavez" / sorted(os.listdir(L / "Hugo_Chavez"))[0],
    "gray": L / "Madonna" / "Madonna_0023.jpg",               # a real grayscale JPEG
    "rgba": L / "Cesar_Gaviria" / "Cesar_Gaviria_0001.jpg",
    "i16": L / "Li_Peng" / sorted(os.listdir(L / "Li_Peng"))[0],
    "unicode": L / "Shimon_Peres" / sorted(os.listdir(L / "Shimon_Peres"))[0],
    "bytes_name": L / "John_Howard" / sorted(os.listdir(L / "John_Howard"))[0],
    "donor": L / "Jerry_Seinfeld" / sorted(os.listdir(L / "Jerry_Seinfeld"))[0],
}

#: a file name that is not valid UTF-8 (Linux allows any bytes but / and NUL)
NON_UTF8 = os.fsdecode(b"caf\xe9 latin-1 name.jpg")
#: relpath of each good file that holds a face -> the PHOTOS entry it was made from
GOOD = {"plain.jpg": "plain", "cmyk.jpg": "cmyk", "gray.jpg": "gray", "rgba.png": "rgba",
        "gray16.png": "i16", "Ünïcødé folder/photo ñ 1.jpg": "unicode",
        NON_UTF8: "bytes_name"}
#: relpath of each bad file -> a word its one-line reason must contain
BAD = {"empty.jpg": "empty", "notes.jpg": "not a readable image",
       "truncated.jpg": "truncated", "corrupt_header.jpg": "corrupt",
       "bomb.png": "megapixels", "sub/broken_link.jpg": "broken symlink",
       "pipe.jpg": "not a regular file"}


def build_tree(src):
    """Good photos in every colour mode plus one file of each bad kind."""
    from PIL import Image
    src.mkdir()
    shutil.copy(PHOTOS["plain"], src / "plain.jpg")
    Image.open(PHOTOS["cmyk"]).convert("CMYK").save(src / "cmyk.jpg", quality=95)
    shutil.copy(PHOTOS["gray"], src / "gray.jpg")
    rgb = np.asarray(Image.open(PHOTOS["rgba"]).convert("RGB"))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0                                   # a transparent margin
    alpha[:20, :] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src / "rgba.png")
    gray = np.asarray(Image.open(PHOTOS["i16"]).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray).save(src / "gray16.png")      # 16-bit grayscale PNG
    (src / "Ünïcødé folder").mkdir()
    shutil.copy(PHOTOS["unicode"], src / "Ünïcødé folder" / "photo ñ 1.jpg")
    shutil.copy(PHOTOS["bytes_name"], src / NON_UTF8)

    jpeg = PHOTOS["donor"].read_bytes()
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("shopping list: eggs, milk\n")
    (src / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    dht = jpeg.index(b"\xff\xc4")                        # Huffman tables zeroed
    (src / "corrupt_header.jpg").write_bytes(jpeg[:dht + 4] + bytes(300) + jpeg[dht + 304:])
    Image.new("1", (12000, 12000)).save(src / "bomb.png")  # 144 MP, a few kB on disk
    (src / "sub").mkdir()
    os.symlink("..", src / "sub" / "loop")               # a folder link to its parent
    os.symlink("does_not_exist.jpg", src / "sub" / "broken_link.jpg")
    os.mkfifo(src / "pipe.jpg")                          # opening it would block forever
    (src / "readme.txt").write_text("not a photo, not even looked at\n")
    return src


def warnings_by_path(stderr):
    """{path: reason} of the `warning: <path>: <reason>` lines."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("warning: "):
            path, _, reason = line[len("warning: "):].partition(": ")  # no ": " in our paths
            out[path] = reason
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """The bad tree embedded once through the CLI: (src, cache, result, digests)."""
    from conftest import _tree_digest
    tmp = tmp_path_factory.mktemp("bad")
    src = build_tree(tmp / "src")
    before = _tree_digest(src)
    cache = tmp / "cache" / "c.npz"
    res = run_cli("embed", src, cache, "-q", "--log-dir", tmp / "logs")
    return src, cache, res, before, _tree_digest(src)


def test_bad_files_are_reported_and_the_run_succeeds(bad_run):
    src, cache, res, _, _ = bad_run
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    warned = warnings_by_path(res.stderr)
    for rel, word in BAD.items():
        reason = warned.get(str(src / rel))
        assert reason, f"no warning line for {rel}:\n{res.stderr}"
        assert word in reason, (rel, reason)
        assert "object at 0x" not in reason, (rel, reason)     # readable, stable reasons
    assert "symlink loop" in warned.get(str(src / "sub" / "loop"), "")
    assert not any(p.startswith(str(src / "sub" / "loop") + os.sep) for p in warned)
    # every stderr line is a warning (no library chatter); stdout is the one result line
    assert all(line.startswith("warning: ") for line in res.stderr.splitlines()), res.stderr
    assert res.stdout.startswith("embed: ") and len(res.stdout.splitlines()) == 1
    assert f"{len(BAD)} failed" in res.stdout


def test_good_files_in_every_mode_are_embedded(bad_run, labeled_cache):
    src, cache, res, _, _ = bad_run
    c = sort_faces.load_cache(cache)
    ref = sort_faces.load_cache(labeled_cache)
    for rel, name in GOOD.items():
        i = c.by_path[str(src / rel)]
        assert c.file_status[i] == "ok", (rel, c.file_error[i])
        assert c.file_n_faces[i] >= 1, f"no face found in {rel}"
        # the colour conversion must not wreck the face: it embeds like the original
        got = c.face_emb[c.face_file == i]
        want = ref.face_emb[ref.face_file == ref.by_path[str(PHOTOS[name])]]
        assert (got @ want.T).max() > 0.8, rel


def test_bad_files_recorded_as_errors(bad_run):
    src, cache, res, _, _ = bad_run
    c = sort_faces.load_cache(cache)
    assert c.n_files == len(GOOD) + len(BAD)         # the loop is not scanned twice
    for rel in BAD:
        i = c.by_path[str(src / rel)]
        assert c.file_status[i] == "error" and c.file_error[i], rel
        assert c.file_n_faces[i] == 0
    assert not any("loop" in p for p in c.file_path.tolist())
    # a re-run does not retry or re-report the bad files it has already read
    rerun = run_cli("embed", src, cache, "-q", "--log-dir", cache.parent / "logs")
    assert rerun.returncode == 0 and " 0 new" in rerun.stdout
    for rel in BAD:
        if rel not in ("sub/broken_link.jpg", "pipe.jpg"):   # not files: reported each run
            assert str(src / rel) not in rerun.stderr
    # --retry-failed tries them again (and they fail again)
    retry = run_cli("embed", src, cache, "-q", "--retry-failed",
                    "--log-dir", cache.parent / "logs")
    assert retry.returncode == 0 and f"{len(BAD)} failed" in retry.stdout
    assert set(warnings_by_path(retry.stderr)) >= {str(src / rel) for rel in BAD}


def test_source_tree_is_byte_identical(bad_run):
    from conftest import _tree_digest
    src, cache, res, before, after = bad_run
    assert before == after == _tree_digest(src)
    assert not any(n.endswith((".npz", ".lock", ".log")) for _, _, fs in os.walk(src)
                   for n in fs)


def test_strict_stops_at_the_first_bad_file(tmp_path, tree_digest):
    src = build_tree(tmp_path / "src")
    before = tree_digest(src)
    res = run_cli("embed", src, tmp_path / "c.npz", "-q", "--strict",
                  "--log-dir", tmp_path / "logs")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert any(str(src / rel) in errors[0] for rel in BAD), errors[0]
    assert "--strict" in errors[0]
    assert tree_digest(src) == before


def test_cache_inside_source_is_refused(copy_photos, tmp_path, tree_digest, capsys):
    src = tmp_path / "src"
    copy_photos(src, 2)
    before = tree_digest(src)
    capsys.readouterr()
    rc = sort_faces.main(["embed", str(src), str(src / "sub" / "c.npz"), "-q",
                          "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error:") and "inside the source" in err[0]
    assert tree_digest(src) == before


def test_missing_source_is_one_line(tmp_path, capsys):
    capsys.readouterr()
    rc = sort_faces.main(["embed", str(tmp_path / "nowhere"), str(tmp_path / "c.npz"),
                          "-q", "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error:") and "nowhere" in err[0]
    assert not (tmp_path / "c.npz").exists()


# An unreadable file. Root reads anything, so as root the embed runs in a child that
# drops to uid/gid 65534 once its modules are loaded (the interpreter may live where
# that user cannot go); as any other user chmod 000 is enough.
CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import sort_faces
warm, src, cache, logs = sys.argv[2:6]
if os.geteuid() == 0:
    # import everything the run needs while still root
    assert sort_faces.main(["embed", warm, cache + ".warm.npz", "-q",
                            "--log-dir", logs + ".warm"]) == 0
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    except OSError as exc:
        print("CANNOT-DROP-PRIVILEGES", exc)
        sys.exit(99)
sys.exit(sort_faces.main(["embed", src, cache, "-q", "--log-dir", logs]))
"""


def _closed_to_others(path):
    """The first folder on the way to path that other users cannot enter, or None."""
    p = Path(path).resolve()
    for folder in [p, *p.parents]:
        if folder.is_dir() and not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def test_unreadable_file_is_reported(copy_photos):
    from conftest import _tree_digest
    if os.geteuid() == 0:       # the child drops to another user, who must still reach
        closed = [(p, c) for p in (ROOT, sys.prefix, sort_faces.pack_folder("default"))
                  if (c := _closed_to_others(p))]           # the tool, venv and model files
        if closed:
            pytest.skip(f"{closed[0][1]} (on the way to {closed[0][0]}) is closed to other "
                        f"users, so the unprivileged child could not load the tool")
    tmp = Path(tempfile.mkdtemp(prefix="sort_faces_unreadable_"))
    try:
        os.chmod(tmp, 0o777)
        src, warm, out = tmp / "src", tmp / "warm", tmp / "out"
        copy_photos(src, 2)
        copy_photos(warm, 1)
        out.mkdir()
        for d in (src, warm, out):
            for folder, dirs, _ in os.walk(d):
                os.chmod(folder, 0o777)
        locked = src / "locked.jpg"
        shutil.copy(PHOTOS["plain"], locked)
        os.chmod(locked, 0)
        before = _tree_digest(src)
        res = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(warm), str(src),
                              str(out / "c.npz"), str(out / "logs")],
                             capture_output=True, text=True, timeout=HANG_GUARD_S)
        if res.returncode == 99:
            pytest.skip(f"cannot drop root privileges here: {res.stdout.strip()}")
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        reason = warnings_by_path(res.stderr).get(str(locked), "")
        assert "ermission denied" in reason, res.stderr
        c = sort_faces.load_cache(out / "c.npz")
        i = c.by_path[str(locked)]
        assert c.file_status[i] == "error" and "ermission denied" in c.file_error[i]
        assert (c.file_status == "ok").sum() == 2
        assert _tree_digest(src) == before
        assert stat.S_IMODE(os.stat(locked).st_mode) == 0
    finally:
        for folder, dirs, files in os.walk(tmp):
            for n in files:
                os.chmod(os.path.join(folder, n), 0o644, follow_symlinks=False)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- records read back
def one_error_line(capsys, *argv, tmp):
    """Run a step in-process; its single stderr line (it must fail with exactly one)."""
    capsys.readouterr()
    rc = sort_faces.main([*map(str, argv), "-q", "--log-dir", str(tmp / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("damage", ["nan", "dim7", "face_file", "lengths", "object"])
def test_a_damaged_cache_is_refused_in_one_line(labeled_cache, tmp_path, capsys, damage):
    """A cache with NaN or 7-d embeddings, a face of a file that is not there, columns of
    different lengths or an object column: one error naming the file, nothing written."""
    cols = dict(np.load(labeled_cache, allow_pickle=False))
    if damage == "nan":
        cols["face_emb"][3, 0] = np.nan
    elif damage == "dim7":
        cols["face_emb"] = cols["face_emb"][:, :7]
    elif damage == "face_file":
        cols["face_file"][0] = len(cols["file_path"]) + 5
    elif damage == "lengths":
        cols["face_bbox"] = cols["face_bbox"][:-1]
    else:
        cols["file_error"] = cols["file_error"].astype(object)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **cols)
    for step in (["cluster", bad, tmp_path / "out"], ["dedup", bad]):
        line = one_error_line(capsys, *step, tmp=tmp_path)
        assert str(bad) in line, line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A cache of two people with a cluster and a refine output, to damage copies of."""
    tmp = tmp_path_factory.mktemp("records")
    for person in ("Tony_Blair", "Hugo_Chavez"):
        shutil.copytree(L / person, tmp / "photos" / person)
    argv = lambda *a: sort_faces.main([*map(str, a), "-q", "--log-dir", str(tmp / "logs")])
    assert argv("embed", tmp / "photos", tmp / "c.npz") == 0
    assert argv("cluster", tmp / "c.npz", tmp / "raw") == 0
    assert argv("refine", tmp / "c.npz", tmp / "ref", "--min-face-short", "40",
                "--min-faces", "4") == 0
    return tmp


def test_a_result_reads_back_as_it_was_written(outputs, tmp_path):
    """Result is the one reader and writer of a step's result: a cluster and a refine output
    read back to exactly what is on disk, and its face records turn into the cache faces they
    were made from and back into the same records."""
    cache = sort_faces.load_cache(outputs / "c.npz")
    for where, kind in (("raw", "cluster"), ("ref", "refine")):
        path = outputs / where / sort_faces.RESULT_KINDS[kind].file
        result = sort_faces.Result.read(path, kind, cache)
        assert result.to_json() == json.loads(path.read_text())
        rows = result.members()
        assert sum(map(len, rows)) >= 8
        for group, faces in zip(result.groups, rows):
            assert [result.record(i) for i in faces] == group["faces"], group["name"]
        assert sort_faces.Result.of_output(outputs / where).to_json() == result.to_json()
        m = {**json.loads(path.read_text()), "kind": "x", "groups": 1, "cache_path": 2}
        (tmp_path / kind).write_text(json.dumps(m))     # fields of a later version: kept
        again = sort_faces.Result.read(tmp_path / kind, kind, cache).to_json()
        assert again == m, kind
        other = "refine" if kind == "cluster" else "cluster"
        with pytest.raises(sort_faces.SortFacesError, match=f"not a schema-1 `{other}`"):
            sort_faces.Result.read(path, other, cache)


@pytest.mark.parametrize("where, damage", [
    ("ref", lambda m: m["facesets"][0]["faces"][0].update(bbox=["1", "2", "3", "4"])),
    ("ref", lambda m: m.pop("facesets")),
    ("ref", lambda m: m["facesets"][0].update(faces="x")),
    ("ref", lambda m: m["params"].update(min_blur="high")),
    ("raw", lambda m: m.update(params="x")),
    ("raw", lambda m: m["clusters"].append(7)),
    ("raw", lambda m: m["singletons"].append({"sha256": "ab", "bbox": [1, 2, 3, 4]})),
    ("raw", lambda m: m["clusters"][0]["faces"][0].update(bbox=[1e300, 1e300, 1e301, 1e301])),
    ("raw", lambda m: m["clusters"][0].update(faces=["DEEP"])),      # nested 5000 deep
    ("raw", lambda m: m.pop("pack")),
    ("ref", lambda m: m["facesets"][0]["faces"][0].update(file=["x"])),
    ("raw", lambda m: m["singletons"][0].update(png=["x"])),
])
def test_a_damaged_manifest_is_refused_in_one_line(outputs, tmp_path, capsys, where, damage):
    """extend (and name) read a manifest back: a damaged one is one error naming the file
    and the field, and the output is left as it was."""
    home = tmp_path
    shutil.copy2(outputs / "c.npz", home / "c.npz")
    for out in ("raw", "ref"):
        shutil.copytree(outputs / out, home / out, symlinks=True)
    argv = lambda *a: sort_faces.main([*map(str, a), "-q", "--log-dir", str(home / "logs")])
    # re-made from this copy of the cache, so that only the damage can refuse them
    assert argv("cluster", home / "c.npz", home / "raw", "--clean") == 0
    assert argv("refine", home / "c.npz", home / "ref", "--min-face-short", "40",
                "--min-faces", "4", "--clean") == 0
    mpath = home / where / ("manifest.json" if where == "raw" else "refine_manifest.json")
    m = json.loads(mpath.read_text())
    damage(m)
    mpath.write_text(json.dumps(m).replace('"DEEP"', "[" * 5000 + "]" * 5000))
    before = mpath.read_bytes()
    line = one_error_line(capsys, "extend", home / "c.npz", home / "raw", "--refine-out",
                          home / "ref", tmp=home)
    assert str(mpath) in line, line
    assert mpath.read_bytes() == before
