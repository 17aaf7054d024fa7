"""Outputs that can never hurt: hostile names from manifests and flags, interrupted runs,
full disks, special files and links. Real photos and the real default pack throughout; the
interrupted runs are real processes killed with SIGKILL."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (DATA, HANG_GUARD_S, ROOT, SCRIPT, _tree_digest, count_files,
                      requires_data, signal_mid_run)
import sort_faces

pytestmark = requires_data

PEOPLE = {"Tony_Blair": 12, "Hugo_Chavez": 12, "John_Howard": 12}
SMALL = ["--min-face-short", "40"]        # the labeled faces are small (LFW, 250 px)


def main(tmp, *args):
    return sort_faces.main([*map(str, args), "-q", "--log-dir", str(tmp / "logs")])


def run(tmp, *args):
    assert main(tmp, *args) == 0


def errors(capsys, tmp, *args):
    """(exit status, stderr lines) of an in-process run."""
    capsys.readouterr()
    rc = main(tmp, *args)
    return rc, capsys.readouterr().err.strip().splitlines()


def cli(*args, timeout=HANG_GUARD_S, preexec=None, script=SCRIPT):
    """The tool in a child process (real exit status, real signals)."""
    return subprocess.run([sys.executable, str(script), *map(str, args), "-q"],
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_error(res_or_lines):
    lines = res_or_lines if isinstance(res_or_lines, list) else \
        res_or_lines.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in "\n".join(lines)
    return lines[0]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """A small library (3 people + a group photo) embedded, enriched, clustered and refined;
    `fresh(name)` copies the photos and the cache to a place a test may break."""
    tmp = tmp_path_factory.mktemp("safety")
    src = tmp / "photos"
    for person, n in PEOPLE.items():
        (src / person).mkdir(parents=True)
        for photo in sorted((DATA / "labeled" / person).glob("*.jpg"))[:n]:
            shutil.copy2(photo, src / person / photo.name)
    shutil.copy2(DATA / "groups" / "insightface_t1.jpg", src / "group.jpg")
    cache = tmp / "cache" / "c.npz"
    run(tmp, "embed", src, cache)
    run(tmp, "enrich", cache)
    run(tmp, "cluster", cache, tmp / "raw")
    run(tmp, "refine", cache, tmp / "ref", "--min-short", "40", "--min-faces", "6")
    refined = json.loads((tmp / "ref" / "refine_manifest.json").read_text())
    assert len(refined["facesets"]) == 3

    def fresh(name):
        """A copy of the photos and of the cache (re-embedded from the copy, so that its
        paths are the copy's) under tmp/name."""
        home = tmp / name
        shutil.copytree(src, home / "photos", copy_function=shutil.copy2)
        shutil.copy2(cache, home / "c.npz")
        run(home, "embed", home / "photos", home / "c.npz")     # new paths: aliases
        run(home, "enrich", home / "c.npz")
        return home

    return {"tmp": tmp, "src": src, "cache": cache, "raw": tmp / "raw", "ref": tmp / "ref",
            "refined": refined, "fresh": fresh}


def refine_manifest_with(lib, where, first_name):
    """A copy of the library's refine manifest whose first faceset is named first_name."""
    m = json.loads(json.dumps(lib["refined"]))
    m["facesets"][0]["name"] = first_name
    where.mkdir(parents=True, exist_ok=True)
    path = where / "refine_manifest.json"
    path.write_text(json.dumps(m))
    return path


# ---------------------------------------------------------------------------- hostile names
HOSTILE = ["../../victim", "/ABS/victim", "", "../evil", ".", "..", ".sort_faces",
           "x" * 250, "a\0b", None]


@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: repr(n)[:20])
def test_hostile_faceset_name_writes_nothing_anywhere(lib, tmp_path, capsys, name):
    """A refine manifest naming a faceset `../../victim`, an absolute path, "" …: one error
    line naming the manifest and the entry; nothing written or deleted anywhere."""
    victim, absolute = tmp_path / "victim", tmp_path / "ABS" / "victim"
    for folder in (victim, absolute, tmp_path / "evil"):
        folder.mkdir(parents=True)
        (folder / "precious.txt").write_text("keep me")
    if isinstance(name, str) and name.startswith("/ABS"):
        name = str(absolute)
    manifest = refine_manifest_with(lib, tmp_path / "ref", name)
    out = tmp_path / "deep" / "out"
    before = _tree_digest(str(tmp_path))
    rc, err = errors(capsys, lib["tmp"], "export-swap", lib["cache"], manifest, out, *SMALL)
    assert rc == 1
    line = one_error(err)
    assert str(manifest) in line and "facesets[0]" in line, line
    assert not out.exists()
    assert _tree_digest(str(tmp_path)) == before


def test_out_manifest_with_hostile_names_is_refused_by_clean(lib, tmp_path, capsys):
    """export-swap --clean on an OUT whose own manifest.json was edited to name `../../x`,
    "" or "/": nothing outside OUT is deleted, the OUT is not touched either."""
    small = refine_manifest_with(lib, tmp_path / "ref", lib["refined"]["facesets"][0]["name"])
    m = json.loads(small.read_text())
    m["facesets"] = m["facesets"][:1]
    small.write_text(json.dumps(m))
    out = tmp_path / "a" / "out"
    run(lib["tmp"], "export-swap", lib["cache"], small, out, *SMALL)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep me")
    for bad in ("../../x", "", "/"):
        mo = json.loads((out / "manifest.json").read_text())
        mo["facesets"][0]["name"] = bad
        (out / "manifest.json").write_text(json.dumps(mo))
        before = _tree_digest(str(tmp_path))
        rc, err = errors(capsys, lib["tmp"], "export-swap", lib["cache"], small, out, *SMALL,
                         "--clean")
        assert rc == 1 and "manifest.json" in one_error(err)
        assert _tree_digest(str(tmp_path)) == before


def test_hostile_ledger_is_refused(lib, tmp_path, capsys):
    out = tmp_path / "out"
    run(lib["tmp"], "cluster", lib["cache"], out)
    ledger = out / ".sort_faces" / "owned.json"
    led = json.loads(ledger.read_text())
    led["entries"]["../../x"] = ["a.jpg"]
    ledger.write_text(json.dumps(led))
    (tmp_path / "x").mkdir()
    rc, err = errors(capsys, lib["tmp"], "cluster", lib["cache"], out, "--clean")
    assert rc == 1 and "owned.json" in one_error(err)
    assert (tmp_path / "x").is_dir()


def test_extend_refuses_hostile_cluster_names(lib, tmp_path, capsys):
    for bad in ("../../x", str(tmp_path / "abs")):
        out = tmp_path / "raw"
        shutil.rmtree(out, ignore_errors=True)
        run(lib["tmp"], "cluster", lib["cache"], out)
        m = json.loads((out / "manifest.json").read_text())
        m["clusters"][0]["name"] = bad
        (out / "manifest.json").write_text(json.dumps(m))
        before = _tree_digest(str(tmp_path))
        rc, err = errors(capsys, lib["tmp"], "extend", lib["cache"], out)
        assert rc == 1 and "clusters[0]" in one_error(err)
        assert _tree_digest(str(tmp_path)) == before


def test_age_split_refuses_a_path_as_faceset(lib, tmp_path, capsys):
    spec = __import__("importlib.util").util.spec_from_file_location(
        "age_split", ROOT / "work" / "age_split.py")
    age_split = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(age_split)
    capsys.readouterr()
    rc = age_split.main(["--cache", str(lib["cache"]), "--out", str(tmp_path / "out"),
                         "--faceset", "../../x", "-q", "--log-dir", str(tmp_path / "logs")])
    assert rc == 1 and "--faceset" in one_error(capsys.readouterr().err.strip().splitlines())
    assert sorted(os.listdir(tmp_path)) == ["logs"]


def test_fsz_entries_are_plain_names(tmp_path):
    with pytest.raises(sort_faces.SortFacesError):
        sort_faces.write_fsz(str(tmp_path / "a.fsz"), [("../../x_0001.png", b"png")])
    assert not (tmp_path / "a.fsz").exists()


# ---------------------------------------------------------------------------- links
def test_out_inside_a_folder_linked_from_the_source_is_refused(lib, tmp_path, capsys):
    """SRC holds a link to a folder; OUT inside that folder is inside a source tree."""
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    for photo in sorted((DATA / "labeled" / "Tony_Blair").glob("*.jpg"))[:3]:
        shutil.copy2(photo, elsewhere / photo.name)
    os.symlink(elsewhere, src / "linked")
    cache = tmp_path / "c.npz"
    run(tmp_path, "embed", src, cache)
    before = _tree_digest(str(elsewhere))
    rc, err = errors(capsys, tmp_path, "cluster", cache, elsewhere / "out")
    assert rc == 1 and "source tree" in one_error(err)
    assert _tree_digest(str(elsewhere)) == before


def test_a_linked_candidates_folder_is_never_written_through(lib, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    small = refine_manifest_with(lib, tmp_path / "ref", lib["refined"]["facesets"][0]["name"])
    run(lib["tmp"], "export-swap", lib["cache"], small, out, *SMALL)
    raw = tmp_path / "raw"           # clustered tight: some faces of the people are alone
    run(lib["tmp"], "cluster", lib["cache"], raw, "--threshold", "0.3")
    args = ["export-swap", lib["cache"], small, out, *SMALL, "--candidates",
            "--raw-manifest", raw / "manifest.json"]
    os.symlink(victim, out / "_candidates")              # the user's link where ours go
    rc, err = errors(capsys, lib["tmp"], *args)
    assert rc == 1 and "_candidates" in one_error(err)
    assert os.listdir(victim) == []
    os.unlink(out / "_candidates")
    run(lib["tmp"], *args)                               # ours, then replaced by a link
    assert (out / "_candidates").is_dir() and not (out / "_candidates").is_symlink()
    shutil.rmtree(out / "_candidates")
    os.symlink(victim, out / "_candidates")
    rc, err = errors(capsys, lib["tmp"], *args)
    assert rc == 1 and "link" in one_error(err)
    assert os.listdir(victim) == []


# ---------------------------------------------------------------------------- results kept
def test_a_failed_export_keeps_the_earlier_bundles(lib, tmp_path, capsys):
    """Photos moved away after a good export: the re-run exports nothing, says so, and the
    earlier bundles stay, with the manifest still describing them."""
    home = lib["fresh"]("moved")
    cache = home / "c.npz"
    ref = home / "ref"
    run(home, "refine", cache, ref, "--min-short", "40", "--min-faces", "6")
    out = home / "out"
    run(home, "export-swap", cache, ref / "refine_manifest.json", out, *SMALL)
    before, m = _tree_digest(str(out)), (out / "manifest.json").read_text()
    shutil.move(home / "photos", home / "moved_away")
    shutil.move(lib["src"], home / "also_moved")          # the aliases too
    try:
        capsys.readouterr()
        assert main(home, "export-swap", cache, ref / "refine_manifest.json", out,
                    *SMALL) == 0
        captured = capsys.readouterr()
    finally:
        shutil.move(home / "also_moved", lib["src"])
    assert "the earlier export is kept" in captured.err
    assert "0 facesets" in captured.out and "no exportable face" in captured.out
    assert _tree_digest(str(out)) == before and (out / "manifest.json").read_text() == m


def test_export_swap_never_replaces_a_faceset_of_another_source(lib, tmp_path):
    """discover made faceset_001 in OUT; export-swap of a refine output whose first set is
    also faceset_001 gives it the next free number and leaves discover's alone."""
    out = tmp_path / "out"
    discover = subprocess.run(
        [sys.executable, str(ROOT / "work" / "discover.py"), "--cache", str(lib["cache"]),
         "--out", str(out), "--source", str(lib["src"] / "Hugo_Chavez"), "--min-short", "40",
         *SMALL, "-q", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert discover.returncode == 0, discover.stderr
    theirs = _tree_digest(str(out / "faceset_001"))
    entry = json.loads((out / "manifest.json").read_text())["facesets"][0]
    assert entry["source"] == "discover"
    run(lib["tmp"], "export-swap", lib["cache"], lib["ref"] / "refine_manifest.json", out,
        *SMALL)
    m = json.loads((out / "manifest.json").read_text())
    assert _tree_digest(str(out / "faceset_001")) == theirs
    assert [e for e in m["facesets"] if e["name"] == "faceset_001"] == [entry]
    refine = [e for e in m["facesets"] if e["source"] == "refine"]
    assert sorted(e["key"][1] for e in refine) == ["faceset_001", "faceset_002",
                                                   "faceset_003"]
    assert "faceset_001" not in {e["name"] for e in refine}
    # a re-run replaces its own facesets, under the same names, and still not discover's
    names = sorted(e["name"] for e in refine)
    run(lib["tmp"], "export-swap", lib["cache"], lib["ref"] / "refine_manifest.json", out,
        *SMALL)
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(e["name"] for e in m["facesets"] if e["source"] == "refine") == names
    assert _tree_digest(str(out / "faceset_001")) == theirs


def _kill_mid_run(args, at, whole, out, script=SCRIPT):
    """SIGKILL a run of the tool into out (fresh each try) once it has written `at` of the
    files an uninterrupted run (whole) has; True once one was killed with work left (its
    manifest missing or listing less than the whole run's)."""
    want = max(1, int(at * count_files(whole)))
    listed = lambda d: [(e["name"], e["pngs"]) for e in json.loads(
        (d / "manifest.json").read_text())["facesets"]] if (d / "manifest.json").exists() else []
    signal_mid_run([script, *args, "-q"], lambda: count_files(out) >= want, signal.SIGKILL,
                   lambda proc: proc.returncode == -signal.SIGKILL
                   and listed(out) != listed(whole),
                   stderr_path=out.parent / "killed-stderr.txt",
                   reset=lambda: shutil.rmtree(out, ignore_errors=True))
    return True


def _bundles(out):
    return {str(p.relative_to(out)): sha(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix in (".fsz", ".png", ".npy")}


@pytest.mark.parametrize("when", [0.5, 0.7, 0.9])
def test_killed_export_swap_finishes_with_the_same_command(lib, tmp_path, when):
    """SIGKILL at several moments of a run (once it has written that fraction of an
    uninterrupted run's files); the same command without --clean then finishes, equal to an
    uninterrupted run (every bundle and PNG byte-identical, the manifest listing them)."""
    args = ["export-swap", lib["cache"], lib["ref"] / "refine_manifest.json"]
    want = tmp_path / "whole"
    res = cli(*args, want, *SMALL)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert _kill_mid_run([*args, out, *SMALL], when, want, out)
    res = cli(*args, out, *SMALL)
    assert res.returncode == 0, res.stderr
    assert _bundles(out) == _bundles(want)
    m, w = (json.loads((d / "manifest.json").read_text()) for d in (out, want))
    assert [e["name"] for e in m["facesets"]] == [e["name"] for e in w["facesets"]]
    for e in m["facesets"]:
        assert (out / e["bundles"]["all"]).is_file()
    assert not (out / ".sort_faces" / "staging").exists()


def test_killed_workflow_finishes_with_the_same_command(lib, tmp_path):
    args = ["--cache", lib["cache"], "--out", tmp_path / "out", "--trusted",
            *[lib["src"] / p for p in PEOPLE], *SMALL, "--log-dir", tmp_path / "logs"]
    script = ROOT / "work" / "build_folders.py"
    whole = tmp_path / "whole"
    res = cli(*[a if a != tmp_path / "out" else whole for a in args], script=script)
    assert res.returncode == 0, res.stderr
    assert _kill_mid_run(args, 0.8, whole, tmp_path / "out", script=script)
    res = cli(*args, script=script)
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(e["name"] for e in m["facesets"]) == sorted(PEOPLE)


def _fsize_limit(nbytes):
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_extend_cut_short_in_a_copy_leaves_no_half_photo(lib, tmp_path):
    """extend stopped in the middle of copying a photo (here: by a file-size limit, the
    way a full disk stops it): no truncated photo is left behind, and the same command
    afterwards finishes with every photo whole."""
    home = tmp_path
    src = home / "photos"
    shutil.copytree(lib["src"], src)
    cache = home / "c.npz"
    later = home / "later"
    for p in sorted(src.rglob("*.jpg"))[1::2]:
        (later / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, later / p.relative_to(src))
    run(home, "embed", src, cache)
    run(home, "cluster", cache, home / "raw")
    run(home, "embed", later, cache)
    sizes = sorted(p.stat().st_size for p in later.rglob("*.jpg"))
    res = cli("extend", cache, home / "raw", "--log-dir", home / "logs",
              preexec=_fsize_limit(sizes[len(sizes) // 2]))
    assert res.returncode == 1 and "File too large" in one_error(res)
    res = cli("extend", cache, home / "raw", "--log-dir", home / "logs")
    assert res.returncode == 0, res.stderr
    m = json.loads((home / "raw" / "manifest.json").read_text())
    assert any("added_by_extend" in f for c in m["clusters"] for f in c["faces"])
    for c in m["clusters"]:
        for f in c["faces"]:
            assert sha(home / "raw" / c["name"] / f["file"]) == f["sha256"], f["file"]


def test_a_full_disk_is_one_error_line_and_keeps_the_earlier_result(lib, tmp_path):
    """Writes beyond a file-size limit fail the way a full disk does (EFBIG): cluster, embed
    and enrich stop with one error line; the earlier result and the cache stay whole, no
    truncated copy is left."""
    limit = _fsize_limit
    out = tmp_path / "raw"
    assert cli("cluster", lib["cache"], out, "--log-dir", tmp_path / "logs").returncode == 0
    before = _tree_digest(str(out))
    res = cli("cluster", lib["cache"], out, "--clean", "--log-dir", tmp_path / "logs",
              preexec=limit(4000))
    assert res.returncode == 1 and "File too large" in one_error(res)
    assert _tree_digest(str(out)) == before
    # embed of new photos into a copy of the cache: the cache keeps what it had
    cache = tmp_path / "c.npz"
    shutil.copy2(lib["cache"], cache)
    more = tmp_path / "more"
    shutil.copytree(DATA / "labeled" / "Naomi_Watts", more)
    cache_sha = sha(cache)
    res = cli("embed", more, cache, "--flush-every", "2", "--log-dir", tmp_path / "logs",
              preexec=limit(20000))
    assert res.returncode == 1 and "File too large" in one_error(res)
    assert sha(cache) == cache_sha
    res = cli("embed", more, cache, "--log-dir", tmp_path / "logs")     # then it resumes
    assert res.returncode == 0, res.stderr
    assert sort_faces.load_cache(cache).n_files == lib_files(lib) + 15


def lib_files(lib):
    return sort_faces.load_cache(lib["cache"]).n_files


def test_out_that_is_a_file_is_one_error_line(lib, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    for args in (["cluster", lib["cache"], out], ["refine", lib["cache"], out],
                 ["export-swap", lib["cache"], lib["ref"] / "refine_manifest.json", out],
                 ["extend", lib["cache"], out]):
        rc, err = errors(capsys, lib["tmp"], *args)
        assert rc == 1 and "not a folder" in one_error(err), args
    assert out.read_text() == "a file"


def test_stray_files_in_parts_are_warnings(lib, tmp_path, capsys):
    cache = tmp_path / "c.npz"
    shutil.copy2(lib["cache"], cache)
    parts = tmp_path / "c.npz.parts"
    parts.mkdir()
    (parts / "notes.npz").write_bytes(b"not a part")
    (parts / "00000007.npz").write_bytes(b"garbage, not a zip")
    more = tmp_path / "more"
    shutil.copytree(DATA / "labeled" / "Naomi_Watts", more)
    capsys.readouterr()
    assert main(tmp_path, "embed", more, cache) == 0
    err = capsys.readouterr().err
    assert "notes.npz: not a cache part, ignored" in err
    assert "00000007.npz: cache part skipped and kept" in err
    assert sorted(os.listdir(parts)) == ["00000007.npz", "notes.npz"]     # left alone
    assert sort_faces.load_cache(cache).n_files == lib_files(lib) + 15
    assert main(tmp_path, "cluster", cache, tmp_path / "out") == 0


# ---------------------------------------------------------------------------- special files
def test_a_photo_replaced_by_a_fifo_hangs_nothing(lib, tmp_path):
    """After embed a photo becomes a FIFO: enrich, cluster, refine, extend, export-swap,
    dedup and age_split each finish (a hang would time out) with a warning about it."""
    home = tmp_path
    src = home / "photos"
    shutil.copytree(lib["src"], src)
    cache = home / "c.npz"
    run(home, "embed", src, cache)
    fifo = sorted((src / "Tony_Blair").glob("*.jpg"))[0]
    fifo.unlink()
    os.mkfifo(fifo)
    logs = ["--log-dir", home / "logs"]
    for args in (["enrich", cache], ["cluster", cache, home / "raw"],
                 ["refine", cache, home / "ref", "--min-short", "40", "--min-faces", "6"],
                 ["export-swap", cache, home / "ref" / "refine_manifest.json", home / "swap",
                  *SMALL],
                 ["dedup", cache], ["extend", cache, home / "raw"]):
        res = cli(*args, *logs, timeout=HANG_GUARD_S)
        assert res.returncode == 0, (args, res.stderr)
        assert "Traceback" not in res.stderr
    res = cli("--cache", cache, "--out", home / "swap", "--faceset", "faceset_001",
              "--probe", "--min-short", "40", *SMALL, *logs,
              script=ROOT / "work" / "age_split.py", timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stderr
    m = json.loads((home / "raw" / "manifest.json").read_text())
    assert all(f["path"] != str(fifo) or f["file"] is None
               for c in m["clusters"] for f in c["faces"])
    assert sort_faces.load_cache(cache).file_enrich_error[
        sort_faces.load_cache(cache).by_path[str(fifo)]].startswith("source unreadable")


# ---------------------------------------------------------------------------- names
def test_multibyte_folder_names_fit(lib, tmp_path):
    """Three nested folders of 40 CJK characters (120 bytes each): every photo is copied
    under a name of at most 255 bytes and the manifest lists files that exist."""
    deep = tmp_path / "src" / ("写真" * 20) / ("家族" * 20) / ("旅行" * 20)
    deep.mkdir(parents=True)
    for photo in sorted((DATA / "labeled" / "Tony_Blair").glob("*.jpg"))[:4]:
        shutil.copy2(photo, deep / ("顔" * 30 + photo.name))
    cache = tmp_path / "c.npz"
    run(tmp_path, "embed", tmp_path / "src", cache)
    run(tmp_path, "cluster", cache, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    faces = [(c["name"], f) for c in m["clusters"] for f in c["faces"]] + \
        [("_singletons", f) for f in m["singletons"]]
    assert len({f["path"] for _, f in faces}) == 4
    for folder, f in faces:
        assert len(os.fsencode(f["file"])) <= 255
        assert (tmp_path / "out" / folder / f["file"]).is_file()


# ---------------------------------------------------------------------------- review bugs
def test_enrich_never_uses_the_previous_photos_pixels(lib, tmp_path, capsys):
    """The first photo enrich reads is corrupt: it is reported, no landmarks are made for
    its faces from another photo, and the run goes on."""
    home = tmp_path
    src = home / "photos"
    shutil.copytree(lib["src"], src)
    cache = home / "c.npz"
    run(home, "embed", src, cache)
    c = sort_faces.load_cache(cache)
    first = str(c.file_path[int(c.face_file[0])])
    st = os.stat(first)                # corrupt in place: same size and mtime as cached
    data = bytearray(Path(first).read_bytes())
    data[2:600] = bytes(598)
    Path(first).write_bytes(bytes(data))
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert main(home, "enrich", cache) == 0
    assert first in capsys.readouterr().err
    c = sort_faces.load_cache(cache)
    mine = c.face_file == c.by_path[first]
    assert mine.any() and (c.face_pose_method[mine] == 0).all()
    assert (c.face_pose_method[~mine] > 0).all()
    assert c.file_enrich_error[c.by_path[first]]


def test_dedup_out_flag_is_honoured_for_any_cache_name(lib, tmp_path):
    cache = tmp_path / "library.cache"
    shutil.copy2(lib["cache"], cache)
    run(tmp_path, "dedup", cache, "--out", tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["step"] == "dedup"
    assert not (tmp_path / "library.cache.duplicates.json").exists()


def test_no_reactor_model_for_a_recognizer_inswapper_does_not_use(lib, tmp_path):
    out = tmp_path / "out"
    run(lib["tmp"], "export-swap", lib["cache"], lib["ref"] / "refine_manifest.json", out,
        *SMALL)
    m = json.loads((out / "manifest.json").read_text())
    assert "w600k_r50" in m["reactor_model_note"]
    assert all(e["reactor_model"] is None for e in m["facesets"])
    assert not list(out.rglob("*.safetensors"))


def test_swap_output_stores_each_png_at_most_twice(lib, tmp_path):
    """Loose PNGs (to look at) and the all-bundle; no top bundle equal to the all one."""
    out = tmp_path / "out"
    run(lib["tmp"], "export-swap", lib["cache"], lib["ref"] / "refine_manifest.json", out,
        *SMALL)
    for e in json.loads((out / "manifest.json").read_text())["facesets"]:
        assert e["pngs"] <= 30 and e["bundles"]["top"] == e["bundles"]["all"]
        assert [p.name for p in (out / e["path"]).glob("*.fsz")] == [f"{e['name']}_all.fsz"]


@pytest.fixture(params=["the source", "a folder inside it"])
def bind_mounted(lib, tmp_path, request):
    """lib's photos, and the same folder (or one of its person folders) again through a
    bind mount (another path: no prefix, and no folder above it, is the source's);
    skipped where this user cannot mount."""
    src, mnt = lib["src"], tmp_path / "mnt"
    mnt.mkdir()
    inside = src if request.param == "the source" else sorted(src.glob("*/"))[0]
    res = subprocess.run(["mount", "--bind", str(inside), str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot bind-mount here: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield src, mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_out_inside_the_source_through_a_bind_mount_is_refused(lib, bind_mounted, tmp_path,
                                                               capsys):
    src, mnt = bind_mounted
    before = _tree_digest(str(src))
    for args in (["cluster", lib["cache"], mnt / "out"],
                 ["refine", lib["cache"], mnt / "sets"],
                 ["embed", src, mnt / "c.npz"]):
        rc, err = errors(capsys, lib["tmp"], *args)
        assert rc == 1 and ("source" in one_error(err)), (args, err)
    assert _tree_digest(str(src)) == before


#: A child that runs the tool and dies (os._exit, like SIGKILL: nothing runs after) at
#: an exact point: the k-th move of a commit ("commit"), or the first file written into
#: staging ("staged"). Deterministic where a signal would race the clock.
DIE_AT = """
import os, runpy, sys
mode, k, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = [0]
def dying(real, hit):
    def call(a, b, *rest, **kw):
        if hit(os.fspath(a), os.fspath(b)):
            seen[0] += 1
            if seen[0] > k:
                os._exit(137)
        return real(a, b, *rest, **kw)
    return call
S, T = "/.sort_faces/staging/", "/.sort_faces/trash/"
if mode == "commit":
    os.rename = dying(os.rename, lambda a, b: S in a or T in b)
else:
    os.replace = dying(os.replace, lambda a, b: S in b)
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""


def _listed_on_disk(out):
    """A manifest in OUT lists only folders and files that are there (never ahead)."""
    m = json.loads((out / "manifest.json").read_text())
    for c in m["clusters"]:
        for f in c["faces"]:
            assert (out / c["name"] / f["file"]).is_file(), (c["name"], f["file"])


@pytest.mark.parametrize("mode, k, then", [("staged", 0, "cluster"), ("commit", 0, "cluster"),
                                           ("commit", 1, "cluster"), ("commit", 3, "cluster"),
                                           ("commit", 12, "cluster"), ("commit", 3, "extend")])
def test_cluster_killed_in_or_before_its_commit_is_finished_by_the_same_command(
        lib, tmp_path, mode, k, then):
    """cluster --clean over an earlier result, killed at an exact point of its commit (or
    before it): OUT never shows a manifest that disagrees with the disk, no temporary
    file survives, and the same command without --clean finishes, equal to a run never
    killed."""
    home = lib["fresh"](f"commit-{mode}-{k}-{then}")
    cache, out, whole = home / "c.npz", home / "out", home / "whole"
    for p in sorted((home / "photos").rglob("*.jpg"))[::3]:    # the earlier result lacks
        p.rename(p.with_suffix(".later"))                         # a third of the photos
    run(home, "embed", home / "photos", cache)
    run(home, "cluster", cache, out)
    shutil.copytree(out, whole, symlinks=True)
    for p in sorted((home / "photos").rglob("*.later")):
        p.rename(p.with_suffix(".jpg"))
    run(home, "embed", home / "photos", cache)
    new = ["--top", "2"]                  # a new result unlike the earlier one
    args = ["cluster", cache, out, "--clean", *new, "--log-dir", home / "logs", "-q"]
    died = subprocess.run([sys.executable, "-c", DIE_AT, mode, str(k), str(SCRIPT),
                           *map(str, args)], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert died.returncode == 137, died.stderr
    if (out / "manifest.json").exists():
        _listed_on_disk(out)
    # the same command without --clean; or a step that reads OUT first (extend), which
    # finds the commit finished, never a missing manifest
    res = cli(then, cache, out, *(new if then == "cluster" else ()), "--log-dir", home / "logs")
    assert res.returncode == 0, res.stderr
    _listed_on_disk(out)
    run(home, "cluster", cache, whole, "--clean", *new)
    strip = lambda d: {k: v.split(" mtime=")[0] for k, v in _tree_digest(str(d)).items()
                       if not k.startswith(".sort_faces") and k != "index.html"}
    if then == "cluster":                      # extend adds its own record on top
        assert strip(out) == strip(whole)
    assert not [p for p in out.rglob(".tmp-*")], list(out.rglob(".tmp-*"))
    assert not (out / ".sort_faces" / "staging").exists()
