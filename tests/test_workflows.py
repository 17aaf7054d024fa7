"""The work/ workflows (build_folders, discover, age_split) on real photos and the real
default pack: one photo tree and one embedded + enriched cache for the whole module.

The labeled photos are small (LFW 250 px, web photos 115-364 px), so every run passes
`--min-face-short 40` (export size gate) and discover / age_split also `--min-short 40`
(refine's quality gate): with the defaults (100 / 90 px) hardly a face would be left."""
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, ROOT, _tree_digest, requires_data
import sort_faces as sf

pytestmark = requires_data

SMALL = ["--min-face-short", "40"]          # export gate: the labeled faces are small
GATES = ["--min-short", "40"]               # refine's quality gate: same reason
THREE = ["Madonna", "Elton_John", "Mindy_Kaling"]
GROUPS = sorted(p.name for p in (DATA / "groups").glob("*.jpg")) if (DATA / "groups").is_dir() \
    else []


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "work" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_folders = load_script("build_folders")
discover = load_script("discover")
age_split = load_script("age_split")


def number(photo):
    return int(re.search(r"_(\d+)\.jpg$", str(photo)).group(1))


def person_of(path):
    """Identity of a labeled photo from its file name (Madonna_0003.jpg -> Madonna);
    'groups' for a group photo."""
    name = os.path.basename(path)
    if name in GROUPS:
        return "groups"
    assert re.fullmatch(r"[A-Za-z_]+_\d{4}\.jpg", name), name
    return name.rsplit("_", 1)[0]


def people_in(out, name):
    """Identities of the photos exported as PNGs of OUT/<name>."""
    m = json.loads((Path(out) / name / "manifest.json").read_text())
    return [person_of(p["path"]) for p in m["pngs"]]


def members_of(out, name):
    """Every face given to a faceset: exported PNGs plus the ones export's gates dropped."""
    m = json.loads((Path(out) / name / "manifest.json").read_text())
    return [p["path"] for p in m["pngs"] + m["dropped"]]


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


def digest(folder):
    return _tree_digest(str(folder))


def call(script, *args, quiet=True, logs):
    argv = [*map(str, args), "--log-dir", str(logs)] + (["-q"] if quiet else [])
    return script.main(argv)


def captured(script, *args, logs):
    """Run a script with messages on: (return code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = call(script, *args, quiet=False, logs=logs)
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- EXIF
def jpeg_with_exif(data, exif=None, comment=None):
    """JPEG bytes with their EXIF replaced (or removed) without re-encoding: the pixels,
    and so the embeddings, stay exactly those of the original."""
    assert data[:2] == b"\xff\xd8"
    i, kept = 2, []
    while data[i + 1] != 0xDA:                               # segments up to start of scan
        seg = data[i:i + 2 + int.from_bytes(data[i + 2:i + 4], "big")]
        if not (data[i + 1] == 0xE1 and seg[4:10] == b"Exif\0\0"):
            kept.append(seg)
        i += len(seg)
    head = b""
    if exif is not None:
        payload = exif.tobytes()                             # starts with b"Exif\0\0"
        head += b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    if comment:
        head += b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return b"\xff\xd8" + head + b"".join(kept) + data[i:]


def exif_of(original=None, modified=None):
    """An Image.Exif with DateTimeOriginal (Exif IFD 0x9003) and/or DateTime (0x0132)."""
    exif = Image.Exif()
    if modified:
        exif[0x0132] = f"{modified}:06:01 12:00:00"
    if original:
        exif.get_ifd(0x8769)[0x9003] = f"{original}:06:01 12:00:00"
    return exif


def mindy_structure(cache_path, src):
    """photo name -> True if its Mindy_Kaling face is in her largest sub-cluster, computed
    the way age_split does (seed, recover, gates, re-centre, average linkage at the default
    pack's thresholds) from the originals already in the cache."""
    cache = sf.load_cache(str(cache_path))
    th = age_split.split_thresholds(cache, None)
    own = build_folders.identity(cache, sf.faces_under(cache, [str(src / "people" /
                                                                   "Mindy_Kaling")]))
    seed = sf.centroid(cache.face_emb[own])
    faces = sf.faces_under(cache, [str(src / "people" / "Mindy_Kaling"), str(src / "mixed")])
    faces = faces[1.0 - cache.face_emb[faces] @ seed <= th["recover"]]
    faces = np.array(sf.quality_gate(cache, faces, sf.Gates(min_face_short=40), []))
    faces = faces[1.0 - cache.face_emb[faces] @ sf.centroid(cache.face_emb[faces])
                  <= th["recentre"]]
    labels = sf.agglomerate(cache.face_emb[faces], th["subcluster"],
                            groups=cache.face_file[faces])
    main = np.bincount(labels).argmax()
    out = {}
    for i, lab in zip(faces, labels):
        name = os.path.basename(str(cache.file_path[cache.face_file[i]]))
        if person_of(name) == "Mindy_Kaling":
            out[name] = out.get(name, False) or bool(lab == main)
    return out


def write_eras(src, dst, structure):
    """Copies of every Mindy_Kaling photo whose EXIF dates put her largest sub-cluster in
    2001-2002 and every other photo in 2015; in the first era one photo has no EXIF at all,
    one only DateTime, one DateTimeOriginal 2001 with a misleading DateTime 2019.
    Returns {photo name: the year age_split should read (None: none)}."""
    dst.mkdir(parents=True)
    years, k = {}, 0
    for photo in sorted((src).glob("*.jpg")):
        data = photo.read_bytes()
        if structure.get(photo.name):
            k += 1
            if k == 1:
                years[photo.name] = None
                data = jpeg_with_exif(data, None, b"no EXIF here")
            elif k == 2:
                years[photo.name] = 2002
                data = jpeg_with_exif(data, exif_of(modified=2002))
            elif k == 3:
                years[photo.name] = 2001
                data = jpeg_with_exif(data, exif_of(original=2001, modified=2019))
            else:
                years[photo.name] = 2001 + k % 2
                data = jpeg_with_exif(data, exif_of(original=2001 + k % 2))
        else:
            years[photo.name] = 2015
            data = jpeg_with_exif(data, exif_of(original=2015))
        (dst / photo.name).write_bytes(data)
    for name, year in years.items():           # what we wrote is what a reader sees
        assert age_split.exif_year(str(dst / name)) == year, name
    return years


# ----------------------------------------------------------------------------- the tree
@pytest.fixture(scope="module")
def tree(data, tmp_path_factory):
    """photos/people/<P>: odd-numbered photos of Madonna, Elton_John, Mindy_Kaling and
    Naomi_Watts; photos/mixed: their even-numbered photos and every group photo;
    photos/party_a: Tony_Blair; photos/party: Jerry_Seinfeld, Hugo_Chavez and byte-identical
    copies of photos of Madonna, Elton_John, Mindy_Kaling and Tony_Blair;
    photos/ages/Mindy_Kaling: her photos with EXIF years (see write_eras). Embedded and
    enriched into one cache; `built` is build_folders' OUT for the first three people."""
    tmp = tmp_path_factory.mktemp("workflows")
    src, logs, cache = tmp / "photos", tmp / "logs", tmp / "cache" / "photos.npz"

    def put(photo, folder):
        (src / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, src / folder / photo.name)

    for person in THREE + ["Naomi_Watts"]:
        for photo in sorted((data / "labeled" / person).glob("*.jpg")):
            put(photo, f"people/{person}" if number(photo) % 2 else "mixed")
    for photo in sorted((data / "groups").glob("*.jpg")):
        put(photo, "mixed")
    for photo in sorted((data / "labeled" / "Tony_Blair").glob("*.jpg")):
        put(photo, "party_a")
    for person in ["Jerry_Seinfeld", "Hugo_Chavez"]:
        for photo in sorted((data / "labeled" / person).glob("*.jpg")):
            put(photo, "party")
    for person in THREE + ["Tony_Blair"]:
        for photo in sorted((data / "labeled" / person).glob("*.jpg"))[:3]:
            put(photo, "party")
    assert sf.main(["embed", str(src), str(cache), "-q", "--log-dir", str(logs)]) == 0
    structure = mindy_structure(cache, src)
    years = write_eras(data / "labeled" / "Mindy_Kaling", src / "ages" / "Mindy_Kaling",
                       structure)
    assert sf.main(["embed", str(src), str(cache), "-q", "--log-dir", str(logs)]) == 0
    assert sf.main(["enrich", str(cache), "-q", "--log-dir", str(logs)]) == 0
    built = tmp / "built"
    assert call(build_folders, "--cache", cache, "--out", built, "--trusted",
                *[src / "people" / p for p in THREE], "--mixed", src / "mixed", *SMALL,
                logs=logs) == 0
    return {"src": src, "cache": cache, "logs": logs, "built": built, "years": years,
            "tmp": tmp}


def copy_out(tree, dst):
    shutil.copytree(tree["built"], dst)
    return dst


# ----------------------------------------------------------------------------- build_folders
def test_build_folders_routes_each_photo_to_its_person(tree):
    m = manifest(tree["built"])
    assert [e["name"] for e in m["facesets"]] == sorted(THREE)
    for e in m["facesets"]:
        label = e["name"]
        who = people_in(tree["built"], label)
        assert who and all(p == label for p in who), (label, Counter(who))
        # routing did its part: photos of the mixed folder were exported too
        m1 = json.loads((tree["built"] / label / "manifest.json").read_text())
        from_mixed = [p["path"] for p in m1["pngs"]
                      if os.path.dirname(p["path"]) == str(tree["src"] / "mixed")]
        assert e["routed"] > 0 and from_mixed, label
        assert all(number(p) % 2 == 0 for p in from_mixed)
        # bystanders in the group photos were routed to nobody
        given = members_of(tree["built"], label)
        assert not [p for p in given if person_of(p) == "groups"], label
        assert e["source"] == "build_folders"
        assert e["trusted"] == str(tree["src"] / "people" / label)


def test_build_folders_markers_and_bundles(tree):
    for label in THREE:
        folder = tree["built"] / label
        marker = (folder / f"{label}.txt").read_text()
        assert marker.startswith(f"{label}\n") and "build_folders" in marker
        for f in (f"{label}_all.fsz", f"{label}.npy"):
            assert (folder / f).stat().st_size > 0, f
        with zipfile.ZipFile(folder / f"{label}_all.fsz") as z:
            assert z.namelist()[0] == f"{label}_0001.png"
        assert not list(folder.glob("*.png"))          # PNGs live in the bundle only


def test_build_folders_adds_only_new_trusted_folders(tree, tmp_path):
    out = copy_out(tree, tmp_path / "out")
    before = manifest(out)
    old = {label: digest(out / label) for label in THREE}
    people = [tree["src"] / "people" / p for p in THREE + ["Naomi_Watts"]]
    args = ["--cache", tree["cache"], "--out", out, "--trusted", *people,
            "--mixed", tree["src"] / "mixed", *SMALL]
    assert call(build_folders, *args, logs=tree["logs"]) == 0
    after = manifest(out)
    assert [e["name"] for e in after["facesets"]] == sorted(THREE + ["Naomi_Watts"])
    assert [e for e in after["facesets"] if e["name"] != "Naomi_Watts"] == before["facesets"]
    assert {label: digest(out / label) for label in THREE} == old
    who = people_in(out, "Naomi_Watts")
    assert who and all(p == "Naomi_Watts" for p in who), Counter(who)
    assert (out / "Naomi_Watts" / "Naomi_Watts.txt").is_file()
    # unchanged folders: a re-run adds nothing and touches nothing
    everything = digest(out)
    assert call(build_folders, *args, logs=tree["logs"]) == 0
    assert digest(out) == everything
    assert manifest(out)["facesets"] == after["facesets"]


def test_build_folders_new_person_gets_no_faces_of_existing_ones(tree, tmp_path):
    """Adding a person later must not hand them mixed-folder faces that belong to a person
    exported earlier: they would have been that person's, had all been built at once."""
    out = copy_out(tree, tmp_path / "out")
    assert call(build_folders, "--cache", tree["cache"], "--out", out, "--trusted",
                tree["src"] / "people" / "Naomi_Watts", "--mixed", tree["src"] / "mixed",
                *SMALL, logs=tree["logs"]) == 0
    given = Counter(person_of(p) for p in members_of(out, "Naomi_Watts"))
    assert set(given) == {"Naomi_Watts"}, given


def test_build_folders_dry_run_writes_nothing(tree, tmp_path, capsys):
    out = copy_out(tree, tmp_path / "out")
    before = digest(out)
    capsys.readouterr()
    assert call(build_folders, "--cache", tree["cache"], "--out", out, "--trusted",
                *[tree["src"] / "people" / p for p in THREE + ["Naomi_Watts"]],
                "--mixed", tree["src"] / "mixed", *SMALL, "--dry-run",
                logs=tree["logs"]) == 0
    assert "build_folders: 1 new facesets [dry run: nothing written]" in capsys.readouterr().out
    assert digest(out) == before


@pytest.mark.parametrize("script", ["build_folders", "discover"])
def test_dry_run_creates_no_output_folder(tree, tmp_path, script):
    """As `cluster --dry-run`: a dry run into a new OUT leaves no OUT behind."""
    out = tmp_path / "new_out"
    if script == "build_folders":
        args = [build_folders, "--trusted", tree["src"] / "people" / "Madonna"]
    else:
        args = [discover, "--source", tree["src"] / "party", *GATES]
    assert call(args[0], "--cache", tree["cache"], "--out", out, *args[1:], *SMALL,
                "--dry-run", logs=tree["logs"]) == 0
    assert not out.exists()


# ----------------------------------------------------------------------------- discover
@pytest.fixture(scope="module")
def discovered(tree):
    """build_folders' OUT, then discover on party_a (Tony_Blair -> faceset_001), a dry run
    on party, and discover on party."""
    out, logs, cache = tree["tmp"] / "discovered", tree["logs"], tree["cache"]
    copy_out(tree, out)
    args = ["--cache", cache, "--out", out, *GATES, *SMALL]
    assert call(discover, *args, "--source", tree["src"] / "party_a", logs=logs) == 0
    first = manifest(out)
    before = digest(out)
    dry = captured(discover, *args, "--source", tree["src"] / "party", "--dry-run", logs=logs)
    after_dry = digest(out)
    assert call(discover, *args, "--source", tree["src"] / "party", logs=logs) == 0
    return {"out": out, "first": first, "before": before, "dry": dry, "after_dry": after_dry}


def test_discover_numbers_after_the_maximum(discovered):
    first = [e["name"] for e in discovered["first"]["facesets"]]
    assert first == sorted(THREE + ["faceset_001"])
    assert set(people_in(discovered["out"], "faceset_001")) == {"Tony_Blair"}
    names = [e["name"] for e in manifest(discovered["out"])["facesets"]]
    assert names == sorted(THREE + ["faceset_001", "faceset_002", "faceset_003"])


def test_discover_finds_exactly_the_new_people(discovered):
    out = discovered["out"]
    found = {}
    for name in ("faceset_002", "faceset_003"):
        who = Counter(person_of(p) for p in members_of(out, name))
        assert len(who) == 1, (name, who)         # one person per new faceset
        found[name] = next(iter(who))
    assert sorted(found.values()) == ["Hugo_Chavez", "Jerry_Seinfeld"]
    sizes = {n: len(members_of(out, n)) for n in found}
    assert sizes["faceset_002"] >= sizes["faceset_003"]      # largest first


def test_discover_leaves_existing_facesets_alone(discovered):
    out, before = discovered["out"], discovered["before"]
    after = digest(out)
    for name in THREE + ["faceset_001"]:
        old = {k: v for k, v in before.items() if k.split(os.sep)[0] == name}
        assert old and {k: after.get(k) for k in old} == old, name
    old_entries = discovered["first"]["facesets"]
    assert [e for e in manifest(out)["facesets"] if e["name"] in
            {x["name"] for x in old_entries}] == old_entries


def test_discover_dry_run_prints_clusters_and_writes_nothing(discovered):
    rc, out, err = discovered["dry"]
    assert rc == 0
    assert discovered["after_dry"] == discovered["before"]
    assert "discover: 2 new facesets ['faceset_002', 'faceset_003']" in out
    assert "[dry run: nothing written]" in out
    clusters = re.findall(r"cluster \d+: (\d+) faces -> (\d+) kept; removed (.*)", err)
    assert len(clusters) >= 2, err
    assert re.search(r"faces under --source, \d+ belong to the 4 facesets already", err)
    gates = [g for _, _, g in clusters if g != "nothing"]
    assert all(re.fullmatch(r"(\d+ \w+(, )?)+", g) for g in gates), gates   # in words


def test_discover_provenance(discovered, tree):
    out = discovered["out"]
    entries = {e["name"]: e for e in manifest(out)["facesets"]}
    for name in ("faceset_001", "faceset_002", "faceset_003"):
        assert entries[name]["source"] == "discover"
        marker = (out / name / f"{name}.txt").read_text()
        assert marker.startswith(f"{name}\ndiscovered by work/discover.py")
        assert (out / name / f"{name}_all.fsz").is_file()
    assert entries["faceset_002"]["source_dirs"] == [str(tree["src"] / "party")]


# ----------------------------------------------------------------------------- age_split
@pytest.fixture(scope="module")
def aged(tree):
    """Mindy_Kaling exported from photos/ages/Mindy_Kaling, then age_split --probe twice
    (the second reads no EXIF), then the split."""
    out, logs = tree["tmp"] / "aged", tree["logs"]
    exif_cache = tree["tmp"] / "exif_years.json"
    assert call(build_folders, "--cache", tree["cache"], "--out", out, "--trusted",
                tree["src"] / "ages" / "Mindy_Kaling", *SMALL, logs=logs) == 0
    args = ["--cache", tree["cache"], "--out", out, "--faceset", "Mindy_Kaling",
            "--anchor-min", "5", "--exif-cache", exif_cache, *GATES, *SMALL]
    start = {"manifest": manifest(out), "files": digest(out)}
    probe = captured(age_split, *args, "--probe", logs=logs)
    second = captured(age_split, *args, "--probe", logs=logs)
    after_probe = digest(out)
    assert call(age_split, *args, logs=logs) == 0
    return {"out": out, "start": start, "probe": probe, "after_probe": after_probe,
            "second": second, "exif_cache": exif_cache, "m": manifest(out), "args": args}


def era_folders(out):
    """Era folders age_split wrote: {name: folder}, full ones in OUT, thin in OUT/_thin."""
    found = {p.name: p for p in out.glob("Mindy_Kaling_*") if p.is_dir()}
    found.update({p.name: p for p in (out / "_thin").glob("Mindy_Kaling_*") if p.is_dir()})
    return found


def marker_years(folder):
    text = (folder / f"{folder.name}.txt").read_text()
    return json.loads(re.search(r"^years: (\[.*\])$", text, re.M).group(1)), text


def test_age_split_eras_named_by_the_exif_years(aged, tree):
    years, m = tree["years"], aged["m"]
    entries = {e["name"]: e for e in m["facesets"]}
    eras = era_folders(aged["out"])
    assert len(eras) >= 2
    written = [{2001, 2002}, {2015}]            # the two eras of write_eras
    seen = set()
    for name, folder in eras.items():
        photos = members_of(folder.parent, name)
        assert photos and all(os.path.dirname(p) == str(tree["src"] / "ages" / "Mindy_Kaling")
                              for p in photos)
        got = {years[os.path.basename(p)] for p in photos} - {None}
        assert name.startswith(f"Mindy_Kaling_{min(got)}-{max(got)}"), name
        assert any(got <= w for w in written), (name, got)
        assert marker_years(folder)[0] == sorted(got), name
        if name in entries:
            assert entries[name]["years"] == sorted(got), name
        seen |= got
    assert seen == {2001, 2002, 2015}
    full = sorted(n for n, f in eras.items() if f.parent == aged["out"])
    assert full == ["Mindy_Kaling_2001-2002"]
    assert "(anchor)" in marker_years(eras[full[0]])[1]


def test_age_split_thin_eras_go_to_thin(aged):
    out, m = aged["out"], aged["m"]
    thin = [e for e in m["facesets"] if e.get("thin")]
    assert thin and all(e["years"] == [2015] and e["source"] == "age_split" for e in thin)
    assert {e["name"] for e in thin} == {n for n, f in era_folders(out).items()
                                         if f.parent.name == "_thin"}
    for e in thin:
        assert e["path"] == f"_thin/{e['name']}"
        folder = out / "_thin" / e["name"]
        assert (folder / f"{e['name']}.txt").is_file()
        assert len(members_of(out / "_thin", e["name"])) < 5        # --anchor-min 5
        assert not (out / e["name"]).exists()
    for name, folder in era_folders(out).items():
        if folder.parent == out:
            assert len(members_of(out, name)) >= 5
            assert (folder / f"{name}_all.fsz").is_file()


def test_age_split_records_full_eras_in_the_manifest(aged):
    out = aged["out"]
    m = manifest(out)
    full = [n for n, f in era_folders(out).items() if f.parent == out]
    entries = {e["name"]: e for e in m["facesets"]}
    assert full and all(n in entries for n in full), (full, sorted(entries))
    for n in full:
        assert entries[n]["source"] == "age_split" and entries[n]["kind"] == "anchor"
        assert entries[n]["faceset"] == "Mindy_Kaling"
    rc, _, err = captured(age_split, *aged["args"], "--probe", logs=out.parent / "logs")
    assert rc == 0, err                          # OUT is still usable by the next run


def test_age_split_thin_era_files_are_where_the_manifest_says(aged):
    out = aged["out"]
    for e in [e for e in aged["m"]["facesets"] if e.get("thin")]:
        for rel in [e["embedding"], *e["bundles"].values()]:
            assert (out / rel).is_file(), rel


def test_age_split_leaves_the_faceset_alone(aged):
    start, m = aged["start"], aged["m"]
    before = {k: v for k, v in start["files"].items() if k.split(os.sep)[0] == "Mindy_Kaling"}
    after = digest(aged["out"])
    assert before and {k: after.get(k) for k in before} == before
    original = [e for e in m["facesets"] if e["name"] == "Mindy_Kaling"]
    assert original == start["manifest"]["facesets"]


def test_age_split_probe_prints_and_writes_nothing(aged):
    rc, out, err = aged["probe"]
    assert rc == 0
    assert aged["after_probe"] == aged["start"]["files"]
    assert "distance to the person's centroid:" in out
    assert re.search(r"sub-clusters at 0\.55: \d+, sizes \[\d+", out)
    assert re.search(r"sub-cluster of \d+: years 2001: \d+, 2002: \d+", out)
    assert re.search(r"sub-cluster of \d+: years 2015: \d+", out)
    reads = int(re.search(r"(\d+) EXIF reads", err).group(1))
    assert reads > 0


def test_age_split_second_run_reads_no_exif(aged, tree):
    rc, out, err = aged["second"]
    assert rc == 0 and re.search(r"\b0 EXIF reads", err), err
    reader = age_split.YearReader(str(aged["exif_cache"]))
    folder = str(tree["src"] / "ages" / "Mindy_Kaling")
    known = [k for k in reader.known if os.path.dirname(k) == folder]
    assert len(known) >= 20
    for path in known:                          # the same files: remembered, not re-read
        assert reader.year(path) == tree["years"][os.path.basename(path)], path
    assert reader.reads == 0


def test_age_split_refuses_photos_without_years(tree, tmp_path):
    """Photos with no EXIF date (the plain labeled copies) cannot be split by era: one line,
    nothing written, instead of a dozen 'unknown' eras."""
    out, logs = tmp_path / "out", tree["logs"]
    assert call(build_folders, "--cache", tree["cache"], "--out", out, "--trusted",
                tree["src"] / "people" / "Madonna", *SMALL, logs=logs) == 0
    before = digest(out)
    rc, _, err = captured(age_split, "--cache", tree["cache"], "--out", out, "--faceset",
                          "Madonna", "--anchor-min", "5", "--exif-cache",
                          tmp_path / "years.json", *GATES, *SMALL, logs=logs)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1, err
    assert re.search(r"only [0-2] of 1\d faces", lines[0]), lines[0]
    assert "--use-mtime" in lines[0] and "Madonna" in lines[0]
    assert digest(out) == before


def test_age_split_and_discover_refuse_damaged_facesets(tree, tmp_path):
    """A faceset manifest without its pngs list, or an embedding that is not one, is one
    error line naming the file."""
    out = copy_out(tree, tmp_path / "out")
    fm_path = out / "Madonna" / "manifest.json"
    fm = json.loads(fm_path.read_text())
    fm_path.write_text(json.dumps({k: v for k, v in fm.items() if k != "pngs"}))
    rc, _, err = captured(age_split, "--cache", tree["cache"], "--out", out, "--faceset",
                          "Madonna", *GATES, *SMALL, logs=tree["logs"])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(fm_path) in lines[0] and "pngs" in lines[0]
    fm_path.write_text(json.dumps(fm))
    np.save(out / "Elton_John" / "Elton_John.npy", np.ones(7, np.float32))
    for script, args in ((discover, ["--source", tree["src"] / "party"]),
                         (age_split, ["--faceset", "Madonna"])):
        rc, _, err = captured(script, "--cache", tree["cache"], "--out", out, *args, *SMALL,
                              logs=tree["logs"])
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:"), (script, err)
        assert "Elton_John.npy" in lines[0] and "not a faceset embedding" in lines[0]


def test_build_folders_names_like_name_and_says_where_faces_went(tree, tmp_path):
    """A folder "Ostern 2020" becomes the faceset "Ostern 2020" (the rule `name` uses);
    when its person is already in OUT, the run says so, and says that the mixed faces
    stayed with the faceset that has them."""
    folder = tmp_path / "Ostern 2020"
    shutil.copytree(tree["src"] / "people" / "Madonna", folder)
    cache = tmp_path / "photos.npz"                 # the shared cache stays as it is
    shutil.copy2(tree["cache"], cache)
    shutil.copytree(str(tree["cache"]) + ".thumbs", str(cache) + ".thumbs")
    assert sf.main(["embed", str(folder), str(cache), "-q", "--log-dir", str(tree["logs"])]) == 0
    out = tmp_path / "out"
    assert call(build_folders, "--cache", cache, "--out", out, "--trusted",
                *[tree["src"] / "people" / p for p in THREE], "--mixed", tree["src"] / "mixed",
                *SMALL, logs=tree["logs"]) == 0
    rc, so, err = captured(build_folders, "--cache", cache, "--out", out, "--trusted",
                           folder, "--mixed", tree["src"] / "mixed", *SMALL, "--dry-run",
                           logs=tree["logs"])
    assert rc == 0, err
    said = so + err
    assert re.search(r"Ostern 2020: \d+ faces from its folder, 0 routed from mixed folders "
                     r"\(\d+ of its faces there stayed with Madonna, already in OUT\)", said), said
    assert "looks like Madonna" in said
    assert call(build_folders, "--cache", cache, "--out", out, "--trusted", folder,
                *SMALL, logs=tree["logs"]) == 0
    assert "Ostern 2020" in {e["name"] for e in manifest(out)["facesets"]}
    assert (out / "Ostern 2020" / "Ostern 2020_all.fsz").is_file()


def test_assign_eras_rules():
    """Anchors stay; a fragment joins its nearest anchor only within the join distance and
    the year window, judged against the anchor as it was (no chain of joins)."""
    rng = np.random.default_rng(0)
    dim = 512
    e = np.eye(dim, dtype=np.float32)

    def around(direction, n):
        x = direction + 0.03 * rng.standard_normal((n, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def at(angle, a=0, b=1):                   # unit vector in the plane of e_a and e_b
        return np.cos(np.radians(angle)) * e[a] + np.sin(np.radians(angle)) * e[b]

    groups = [   # (embeddings, years): label k = position here
        (around(e[0], 25), [2000] * 25),                   # 0: anchor A
        (around(e[2], 25), [2020] * 24 + [None]),          # 1: anchor B
        (around(at(50), 19), [2002] * 19),                 # 2: near A, close year: joins A
        (around(at(10, 0, 3), 3), [2015] * 3),             # 3: near A, 15 years off: alone
        (around(e[4], 3), [2000] * 3),                     # 4: far from both: alone
        (around(at(70), 2), [2001, 2003]),                 # 5: near only A grown by 2
        (around(at(10, 0, 5), 2), [None, None]),           # 6: near A, year unknown: alone
        (around(at(15, 2, 6), 4), [2021, 2019, 2021, 2022]),  # 7: near B: joins B
    ]
    emb = np.concatenate([g for g, _ in groups])
    years = [y for _, ys in groups for y in ys]
    labels = np.concatenate([[k] * len(g) for k, (g, _) in enumerate(groups)])
    pos = {k: np.flatnonzero(labels == k).tolist() for k in range(len(groups))}

    # the chain case is real: 5 is within `join` of A grown by 2, not of A itself
    d = lambda a, b: 1.0 - float(sf.centroid(emb[a]) @ sf.centroid(emb[b]))
    assert d(pos[5], pos[0]) > 0.45 >= d(pos[5], pos[0] + pos[2])
    assert d(pos[2], pos[0]) <= 0.45 and d(pos[3], pos[0]) <= 0.45 and d(pos[6], pos[0]) <= 0.45

    eras = age_split.assign_eras(emb, years, labels, anchor_min=20, join=0.45, window=5)
    got = sorted((sorted(m), kind) for m, kind in eras)
    want = sorted([(pos[0] + pos[2], "anchor"), (pos[1] + pos[7], "anchor"),
                   (pos[3], "fragment"), (pos[4], "fragment"), (pos[5], "fragment"),
                   (pos[6], "fragment")])
    assert got == want


# ----------------------------------------------------------------------------- README
@pytest.mark.parametrize("script", ["build_folders", "discover", "age_split"])
def test_readme_documents_each_workflow_in_order(script):
    """A README section per workflow, its commands in the order a user runs them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    starts = [k for k, line in enumerate(lines)
              if line.startswith("#") and script in line]
    assert starts, f"README.md has no section (heading) for work/{script}.py"
    k = starts[0]
    level = len(lines[k]) - len(lines[k].lstrip("#"))
    end = next((j for j in range(k + 1, len(lines))
                if lines[j].startswith("#") and
                len(lines[j]) - len(lines[j].lstrip("#")) <= level), len(lines))
    section = "\n".join(lines[k:end])
    where = [section.find(cmd) for cmd in ("sort_faces.py embed ", "sort_faces.py enrich ",
                                            f"work/{script}.py ")]
    assert -1 not in where and where == sorted(where), (script, where)
