"""cluster and refine on the real labeled photos (+ group photos for the cannot-link rule)."""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import DATA, HANG_GUARD_S, calib_truth, labeled_truth, requires_data, scores
import sort_faces

pytestmark = requires_data


@pytest.fixture(scope="module")
def mixed_cache(labeled_cache, tmp_path_factory):
    """labeled/ + groups/ in one cache (a copy of the session cache, groups folded in)."""
    tmp = tmp_path_factory.mktemp("mixed")
    cache = tmp / "mixed.npz"
    shutil.copy(labeled_cache, cache)
    assert sort_faces.main(["embed", str(DATA / "groups"), str(cache), "-q",
                            "--log-dir", str(tmp / "logs")]) == 0
    return cache


@pytest.fixture(scope="module")
def clustered(mixed_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("clustered") / "people"
    assert sort_faces.main(["cluster", str(mixed_cache), str(out), "-q",
                            "--log-dir", str(out.parent / "logs")]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def _accuracy(cache, truth, method="auto"):
    labels = sort_faces.identities(cache.face_emb, cache.face_file,
                                   sort_faces.identity_rule(cache), method)
    idx = sorted(truth)
    return scores([truth[i] for i in idx], labels[idx])


def test_accuracy_on_labeled_identities(mixed_cache):
    """Nobody merged, hardly anybody split, with every face of labeled/ and groups/ in."""
    cache = sort_faces.load_cache(mixed_cache)
    truth = labeled_truth(cache)
    assert len(truth) >= 0.97 * 276
    s = _accuracy(cache, truth)
    assert s["pairwise_p"] == 1.0 and s["pairwise_f"] >= 0.99 and s["bcubed_f"] >= 0.99, s


@pytest.fixture(scope="module")
def calib_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    assert sort_faces.main(["embed", str(DATA / "calib"), str(tmp / "calib.npz"), "-q",
                            "--log-dir", str(tmp / "logs")]) == 0
    return sort_faces.load_cache(tmp / "calib.npz")


def test_accuracy_on_calib_with_the_defaults(calib_cache):
    """159 people (a family and twins among them) and 400 strangers, every face detected
    clustered: the acceptance bar (pairwise and BCubed F >= 0.99, precision >= 0.995)."""
    truth = calib_truth(calib_cache)
    assert len(truth) >= 1500
    s = _accuracy(calib_cache, truth)
    assert s["pairwise_p"] >= 0.995 and s["pairwise_f"] >= 0.99 and s["bcubed_f"] >= 0.99, s


def test_graph_path_gives_the_same_people(calib_cache):
    """The neighbour graph found through the IVF index (what large libraries use) gives
    the people the exact search gives."""
    exact = _accuracy(calib_cache, calib_truth(calib_cache), "exact")
    graph = _accuracy(calib_cache, calib_truth(calib_cache), "graph")
    assert graph == exact


def test_layout_numbering_and_manifest(clustered):
    out, m = clustered
    assert m["schema"] == 1 and m["pack"]["name"] == "default"
    names = [c["name"] for c in m["clusters"]]
    assert names == [f"person_{k:03d}" for k in range(1, len(names) + 1)]
    sizes = [len(c["faces"]) for c in m["clusters"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 2
    assert len(names) >= 18            # 18 labeled people, plus people of the group photos
    on_disk = sorted(p.name for p in out.iterdir() if p.name.startswith("person_"))
    assert on_disk == names
    for c in m["clusters"]:
        files = {f["file"] for f in c["faces"]}
        assert files <= set(os.listdir(out / c["name"]))
        assert (out / c["name"] / "_contact.jpg").stat().st_size > 1000
        for f in c["faces"]:
            assert os.path.isabs(f["path"]) and os.path.exists(f["path"])
            assert len(f["bbox"]) == 4 and 0 < f["det_score"] <= 1
        # two faces of one photo are two people
        assert len({f["sha256"] for f in c["faces"]}) == len(c["faces"])
    assert set(os.listdir(out / "_singletons")) >= {f["file"] for f in m["singletons"]}
    noface = {os.path.basename(p) for p in m["noface"]}
    assert "dlib_dogs.jpg" in noface
    assert len(os.listdir(out / "_noface")) == len(m["noface"])
    # a group photo with several people shows up in several folders
    t1 = [c["name"] for c in m["clusters"] for f in c["faces"]
          if f["path"].endswith("insightface_t1.jpg")]
    assert len(t1) == len(set(t1))


def test_review_page_lists_every_cluster(clustered):
    out, m = clustered
    page = (out / "index.html").read_text()
    sections = re.findall(r'<section id="([^"]+)"', page)
    assert sections == [c["name"] for c in m["clusters"]] + ["_singletons", "_noface"]
    imgs = _images(page)
    assert all(_decodes(src) for src, _ in imgs)
    assert not any(none for _, none in imgs)               # every face has its thumbnail
    shown = lambda n: min(n, sort_faces.SECTION_FACES)
    assert len(imgs) == sum(shown(len(c["faces"])) for c in m["clusters"]) \
        + len(m["singletons"])


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed")
def test_review_page_in_headless_chromium(clustered, tmp_path):
    """Loads from disk with no console errors, every thumbnail decodes, one section per
    cluster."""
    out, m = clustered
    probe = out / "_probe.html"      # the page with lazy loading off and an image check
    page = (out / "index.html").read_text().replace(' loading="lazy"', "")
    probe.write_text(page.replace("</body>", "<script>addEventListener('load',()=>{for(const i "
                                  "of document.images) if(!i.naturalWidth) console.error("
                                  "'broken image '+i.src)})</script></body>"))
    try:
        r = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=HANG_GUARD_S)
    finally:
        probe.unlink()
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert r.stdout.count("<section") == len(m["clusters"]) + 2
    assert r.stdout.count("<img") == sum(len(c["faces"]) for c in m["clusters"]) \
        + len(m["singletons"])


def test_flags_top_min_size_dry_run(mixed_cache, tmp_path, capsys):
    out = tmp_path / "top"
    assert sort_faces.main(["cluster", str(mixed_cache), str(out), "--top", "3", "-q"]) == 0
    assert sorted(p.name for p in out.glob("person_*")) == ["person_001", "person_002",
                                                            "person_003"]
    assert json.loads((out / "manifest.json").read_text())["omitted_faces"] > 0
    out = tmp_path / "min5"
    assert sort_faces.main(["cluster", str(mixed_cache), str(out), "--min-cluster-size", "5",
                            "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert min(len(c["faces"]) for c in m["clusters"]) >= 5
    dry = tmp_path / "dry"
    capsys.readouterr()
    assert sort_faces.main(["cluster", str(mixed_cache), str(dry), "--dry-run", "-q"]) == 0
    assert not dry.exists()
    assert "people (sizes [" in capsys.readouterr().out


def test_clean_refusals(mixed_cache, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["cluster", str(mixed_cache), str(out), "-q", "--top", "2"]
    assert sort_faces.main(args) == 0
    assert sort_faces.main(args) == 1
    assert "pass --clean" in capsys.readouterr().err
    # --clean replaces only what sort_faces wrote: a user's files in OUT and inside one of
    # its folders are left where they are
    (out / "person_001" / "stale.jpg").write_bytes(b"x")
    (out / "my_notes.txt").write_text("mine")
    old_photos = set(os.listdir(out / "person_002"))
    assert sort_faces.main(args + ["--clean", "--top", "3"]) == 0
    assert (out / "person_001" / "stale.jpg").read_bytes() == b"x"
    assert (out / "my_notes.txt").read_text() == "mine"
    m = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in m["clusters"]] == ["person_001", "person_002", "person_003"]
    assert set(os.listdir(out / "person_002")) == {f["file"] for f in m["clusters"][1]["faces"]} \
        | {"_contact.jpg"}
    assert old_photos  # (the old person_002's photos are gone unless still in it)
    # a folder of the user's where a result goes is refused, before any work
    (out / "person_anna").mkdir()
    assert sort_faces.main(args + ["--clean"]) == 1
    err = capsys.readouterr().err
    assert "person_anna" in err and "not written by sort_faces" in err
    assert (out / "person_anna").is_dir()
    # an OUT holding only a user's files is refused with or without --clean
    mine = tmp_path / "mine"
    (mine / "person_x").mkdir(parents=True)
    (mine / "index.html").write_text("my page")
    for extra in ([], ["--clean"]):
        assert sort_faces.main(["cluster", str(mixed_cache), str(mine), "-q"] + extra) == 1
        assert "did not write" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["index.html", "person_x"]
    # OUT inside a source tree is refused, nothing written there
    inside = DATA / "labeled" / "_sort_faces_out"
    assert sort_faces.main(["cluster", str(mixed_cache), str(inside), "-q"]) == 1
    assert "source tree" in capsys.readouterr().err and not inside.exists()


def test_bad_cache_is_one_line(tmp_path, capsys):
    assert sort_faces.main(["cluster", str(tmp_path / "nope.npz"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cache not found")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a cache")
    assert sort_faces.main(["cluster", str(junk), str(tmp_path / "o")]) == 1
    assert "not a sort_faces cache" in capsys.readouterr().err


def test_aliases_are_listed(copy_photos, tmp_path):
    src = tmp_path / "src"
    photos = copy_photos(src, ["Madonna/Madonna_0001.jpg", "Madonna/Madonna_0002.jpg",
                               "Madonna/Madonna_0003.jpg"])
    shutil.copy(photos[0], src / "copy of madonna.jpg")
    cache, out = tmp_path / "c.npz", tmp_path / "out"
    assert sort_faces.main(["embed", str(src), str(cache), "-q"]) == 0
    assert sort_faces.main(["cluster", str(cache), str(out), "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    faces = [f for c in m["clusters"] for f in c["faces"]] + m["singletons"]
    listed = {f["path"] for f in faces} | {a for f in faces for a in f.get("aliases", [])}
    assert str(src / "copy of madonna.jpg") in listed and str(photos[0]) in listed
    assert len(faces) == 3                     # the copy is not a second face


def test_refine_gates_and_layout(mixed_cache, tmp_path):
    out = tmp_path / "refined"
    # the labeled photos are small (LFW 250 px): lower the size gate and the set size
    assert sort_faces.main(["refine", str(mixed_cache), str(out), "-q", "--min-short", "40",
                            "--min-faces", "8"]) == 0
    m = json.loads((out / "refine_manifest.json").read_text())
    sets = m["facesets"]
    # numbered by person (the cache's identities: earlier runs on it made them), one each
    names = [s["name"] for s in sets]
    assert all(re.fullmatch(r"faceset_\d{3,}", n) for n in names) and len(set(names)) == len(names)
    assert [len(s["faces"]) for s in sets] == sorted((len(s["faces"]) for s in sets),
                                                     reverse=True)
    assert 12 <= len(sets) <= 18
    cache = sort_faces.load_cache(mixed_cache)
    truth = {str(cache.file_path[cache.face_file[i]]): who
             for i, who in labeled_truth(cache).items()}
    for s in sets:
        assert s["images"] >= 8
        people = {truth.get(f["path"]) for f in s["faces"]} - {None}
        assert len(people) == 1, (s["name"], people)     # one identity per faceset
        assert all(f["short_edge"] >= 40 and f["blur"] >= 40 and f["det_score"] >= 0.6
                   for f in s["faces"])
        assert set(os.listdir(out / s["name"])) >= {f["file"] for f in s["faces"]}
    gates = {d["gate"] for d in m["dropped"]}
    assert {"min_face_short", "min_faces"} <= gates
    assert m["gate_counts"]["min_face_short"] == sum(d["gate"] == "min_face_short"
                                                     for d in m["dropped"])
    assert re.findall(r'<section id="(faceset_\d+)"', (out / "index.html").read_text()) \
        == [s["name"] for s in sets]


def test_refine_dry_run_and_the_packs_defaults(mixed_cache, tmp_path, capsys):
    """--dry-run writes nothing and plans what the real run writes; the real run records
    the default pack's calibrated values (docs/calibration.md)."""
    out, logs = tmp_path / "r", ["--log-dir", str(tmp_path / "logs")]
    assert sort_faces.main(["refine", str(mixed_cache), str(out), "--dry-run", "-q", *logs]) == 0
    assert not out.exists()
    dry = capsys.readouterr().out
    assert sort_faces.main(["refine", str(mixed_cache), str(out), "-q", *logs]) == 0
    m = json.loads((out / "refine_manifest.json").read_text())
    assert f"-> {len(m['facesets'])} facesets" in dry and m["facesets"]
    assert {k: m["params"][k] for k in ("initial_threshold", "merge_threshold",
                                        "join_threshold", "join_margin", "outlier_threshold",
                                        "min_face_short", "min_faces")} == {
        "initial_threshold": 0.60, "merge_threshold": 0.45, "join_threshold": 0.76,
        "join_margin": 0.12, "outlier_threshold": 0.60, "min_face_short": 90, "min_faces": 15}


# ---------------------------------------------------------------------------- review page
def _images(html_text):
    """[(src, is the grey no-thumbnail tile)] of the page's face thumbnails."""
    return [(src, " class=none " in tag) for tag, src in
            re.findall(r'(<img src="([^"]+)"[^>]*>)', html_text)]


def _decodes(src):
    """A thumbnail inlined as a JPEG data: URI that decodes to a real image."""
    import base64
    import cv2
    import numpy as np
    head, _, data = src.partition(",")
    if head != "data:image/jpeg;base64":
        return False
    img = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
    return img is not None and img.shape[:2] == (sort_faces.THUMB_PX, sort_faces.THUMB_PX)


def _sections(page_path):
    """{section id: [(src, none)]} of one review page."""
    text = page_path.read_text()
    return {sid: _images(body) for sid, body in
            re.findall(r'<section id="([^"]+)"(.*?)</section>', text, re.S)}


def test_the_page_is_made_without_the_photos(copy_photos, tmp_path):
    """Thumbnails are stored at embed: with every source photo gone (a drive unplugged),
    `cluster` still shows every face; only the copies are missing, each one warning."""
    src = tmp_path / "src"
    copy_photos(src, [f"Tony_Blair/{n}" for n in
                      sorted(os.listdir(DATA / "labeled" / "Tony_Blair"))[:12]])
    logs = ["--log-dir", str(tmp_path / "logs")]
    assert sort_faces.main(["embed", str(src), str(tmp_path / "c.npz"), "-q", *logs]) == 0
    shutil.rmtree(src)
    out = tmp_path / "out"
    assert sort_faces.main(["cluster", str(tmp_path / "c.npz"), str(out), "-q", *logs]) == 0
    imgs = _images((out / "index.html").read_text())
    assert len(imgs) >= 12 and all(_decodes(src) and not none for src, none in imgs)
    assert [p.name for p in (out / "person_001").glob("*.jpg")] == ["_contact.jpg"]


def test_an_older_cache_gets_its_thumbnails_once(copy_photos, tmp_path, capsys):
    src = tmp_path / "src"
    copy_photos(src, [f"Hugo_Chavez/{n}" for n in
                      sorted(os.listdir(DATA / "labeled" / "Hugo_Chavez"))[:8]])
    cache, logs = tmp_path / "c.npz", ["--log-dir", str(tmp_path / "logs")]
    assert sort_faces.main(["embed", str(src), str(cache), "-q", *logs]) == 0
    shutil.rmtree(str(cache) + ".thumbs")                   # as a cache made before the store
    out = tmp_path / "out"
    assert sort_faces.main(["cluster", str(cache), str(out), "-q", *logs]) == 0
    assert {none for _, none in _images((out / "index.html").read_text())} == {True}
    capsys.readouterr()
    assert sort_faces.main(["embed", str(src), str(cache), *logs]) == 0
    assert "thumbnails made for" in capsys.readouterr().out
    batches = sorted(os.listdir(str(cache) + ".thumbs"))
    assert sort_faces.main(["embed", str(src), str(cache), *logs]) == 0
    assert "thumbnails made for" not in capsys.readouterr().out
    assert sorted(os.listdir(str(cache) + ".thumbs")) == batches
    assert sort_faces.main(["cluster", str(cache), str(out), "-q", "--clean", *logs]) == 0
    imgs = _images((out / "index.html").read_text())
    assert imgs and all(_decodes(src) and not none for src, none in imgs)


def test_a_big_result_is_paged(mixed_cache, tmp_path, monkeypatch):
    """Pages of at most PAGE_FACES thumbnails; a person shows its closest and farthest
    faces; singletons run over pages; every page links every other; nothing is lost."""
    monkeypatch.setattr(sort_faces, "PAGE_FACES", 40)
    monkeypatch.setattr(sort_faces, "SECTION_FACES", 9)
    out = tmp_path / "out"
    assert sort_faces.main(["cluster", str(mixed_cache), str(out), "-q",
                            "--log-dir", str(tmp_path / "logs")]) == 0
    m = json.loads((out / "manifest.json").read_text())
    pages = [out / "index.html"] + sorted((out / "_thumbs").glob("page_*.html"))
    assert len(pages) >= 5
    seen, singles = [], 0
    shown = {}
    for page in pages:
        sections = _sections(page)
        imgs = [img for found in sections.values() for img in found]
        assert 0 < len(imgs) <= 40 and all(_decodes(src) for src, _ in imgs)
        for link in re.findall(r'<nav>pages: (.*?)</nav>', page.read_text())[0].split():
            href = re.search(r'href="([^"]+)"', link)
            assert href is None or (page.parent / href.group(1)).resolve() in \
                [p.resolve() for p in pages]
        seen += [i for i in sections if i.startswith("person_")]
        singles += sum(len(v) for k, v in sections.items() if k.startswith("_singletons"))
        shown.update(sections)
    assert seen == [c["name"] for c in m["clusters"]]
    assert singles == len(m["singletons"])
    big = max(m["clusters"], key=lambda c: len(c["faces"]))
    assert len(shown[big["name"]]) == 9


def test_a_look_alike_crowd_stays_out_of_a_persons_folder(tmp_path):
    """Issue 24 on real photos: beside ten photos of George W. Bush, two photos each of
    George H. W. Bush and of Michael Bloomberg. Each pair is a small cluster that would
    join him alone (within 0.76, no other person near), but the two pairs are 0.87 apart,
    too far to join each other: his folder takes in neither, and each pair stays itself."""
    src = tmp_path / "photos"
    picks = [f"George_W_Bush/George_W_Bush_{i:04d}.jpg" for i in range(1, 11)] + [
        "George_HW_Bush/George_HW_Bush_0005.jpg", "George_HW_Bush/George_HW_Bush_0006.jpg",
        "Michael_Bloomberg/Michael_Bloomberg_0004.jpg",
        "Michael_Bloomberg/Michael_Bloomberg_0009.jpg"]
    for rel in picks:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / "calib" / rel, src / rel)
    cache, out = tmp_path / "c.npz", tmp_path / "people"
    logs = ["-q", "--log-dir", str(tmp_path / "logs")]
    assert sort_faces.main(["embed", str(src), str(cache), *logs]) == 0
    assert sort_faces.main(["cluster", str(cache), str(out), "--min-cluster-size", "2",
                            *logs]) == 0
    m = json.loads((out / "manifest.json").read_text())
    people = {c["name"]: {os.path.basename(os.path.dirname(f["path"])) for f in c["faces"]}
              for c in m["clusters"]}
    assert sorted(map(sorted, people.values())) == [
        ["George_HW_Bush"], ["George_W_Bush"], ["Michael_Bloomberg"]], people
    bush = next(c for c in m["clusters"] if "George_W_Bush" in people[c["name"]])
    assert len(bush["faces"]) == 10
