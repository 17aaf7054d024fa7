"""export-swap on the real labeled photos + group photos: upright single-face PNG crops
(512 px, or smaller where the photo holds fewer pixels), .fsz bundles that load the way
roop-unleashed loads them, the composite quality rank, crops from group photos,
reproducible bundles, candidates and the refusals."""
import hashlib
import json
import os
import shutil
import warnings
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import DATA, requires_data
import sort_faces

pytestmark = requires_data

GROUP_PHOTOS = ("insightface_t1.jpg",        # six people side by side
                "dlib_2008_002506.jpg")      # three close faces: needs a tighter crop


def main(tmp, *args):
    return sort_faces.main([*map(str, args), "-q", "--log-dir", str(tmp / "logs")])


def run(tmp, *args):
    assert main(tmp, *args) == 0


def run_err(tmp, capsys, *args):
    """(exit status, stderr lines) of an in-process run."""
    capsys.readouterr()
    rc = main(tmp, *args)
    return rc, capsys.readouterr().err.strip().splitlines()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def fsz_digests(out):
    return {str(p.relative_to(out)): sha(p.read_bytes()) for p in sorted(out.glob("*/*.fsz"))}


@pytest.fixture(scope="module")
def swap(labeled_cache, tmp_path_factory):
    """labeled/ + groups/ embedded and enriched, clustered, refined and exported twice into
    the same OUT: first plainly, then with --candidates."""
    tmp = tmp_path_factory.mktemp("swap")
    cache = tmp / "mixed.npz"
    shutil.copy(labeled_cache, cache)
    run(tmp, "embed", DATA / "groups", cache)
    run(tmp, "enrich", cache)
    # The raw output only feeds --candidates: clustered tighter than the pack's rule (no
    # stage 3) so that a few faces of faceset people end up singletons (with the defaults
    # nearly every singleton is a stranger).
    raw, ref, out = tmp / "raw", tmp / "ref", tmp / "out"
    run(tmp, "cluster", cache, raw, "--threshold", "0.45", "--join-threshold", "0")
    # The labeled photos are small (LFW: 250 px, faces ~100 px): lower the size gates.
    run(tmp, "refine", cache, ref, "--min-short", "40", "--min-faces", "6")
    args = [cache, ref / "refine_manifest.json", out, "--min-face-short", "40"]
    run(tmp, "export-swap", *args)
    first = fsz_digests(out)
    first_candidates = (out / "_candidates").exists()
    # the second run into the same OUT adds --candidates, which must not touch the bundles
    run(tmp, "export-swap", *args, "--candidates", "--raw-manifest", raw / "manifest.json")
    c = sort_faces.load_cache(cache)
    return SimpleNamespace(tmp=tmp, cache_path=cache, cache=c, raw=raw, ref=ref, out=out,
                           args=args, first=first, first_candidates=first_candidates,
                           manifest=json.loads((out / "manifest.json").read_text()),
                           index=sort_faces.face_index(c))


def png(out, name, file):
    """The bytes of a faceset's PNG, from its bundle (loose copies are opt-in)."""
    with zipfile.ZipFile(out / name / f"{name}_all.fsz") as z:
        return z.read(file)


def faceset_manifests(out, manifest):
    return {e["name"]: json.loads((out / e["name"] / "manifest.json").read_text())
            for e in manifest["facesets"]}


class Looker:
    """What a swap tool sees in a PNG, memoised by content: the pack's detector at score 0.5
    at native size (padded, never upscaled) and in a 640x640 letterbox (as insightface's
    FaceAnalysis sees it), the two merged the way export-swap's one-face check merges them,
    and the embedding of every face of the 640 view."""

    def __init__(self, cache):
        import cv2
        self.cv2 = cv2
        self.det = sort_faces.swap_models(cache)
        self.rec = sort_faces.load_models(sort_faces.locate_pack("default"))["rec"]
        self.seen = {}

    def look(self, data):
        key = sha(data)
        if key not in self.seen:
            from insightface.utils import face_align
            img = self.cv2.imdecode(np.frombuffer(data, np.uint8), self.cv2.IMREAD_COLOR)
            native, _, _ = sort_faces.detect_faces(self.det, img, det_thresh=0.5)
            boxes, kps = self.det.detect(img, input_size=(640, 640), det_thresh=0.5)
            merged = []
            for b in list(native) + list(boxes[:, :4]):
                if all(sort_faces.box_iou(b, m) < 0.4 for m in merged):
                    merged.append(b)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                crops = [face_align.norm_crop(img, k) for k in kps]
            emb = self.rec.get_feat(crops) if crops else np.zeros((0, 512), np.float32)
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            self.seen[key] = SimpleNamespace(shape=img.shape, native=len(native),
                                             at640=len(boxes), merged=len(merged), emb=emb)
        return self.seen[key]


@pytest.fixture(scope="module")
def looker(swap):
    return Looker(swap.cache)


# ---------------------------------------------------------------------------- PNGs
def test_export_has_facesets(swap):
    m = swap.manifest
    assert m["step"] == "export-swap" and m["pack"]["name"] == "default"
    assert len(m["facesets"]) >= 15
    assert sum(e["pngs"] for e in m["facesets"]) >= 150
    for e in m["facesets"]:
        assert e["pngs"] >= 5 and e["bundles"] and e["embedding"]


def test_every_png_has_exactly_one_face_and_an_honest_size(swap, looker):
    """512 px unless the photo holds fewer pixels around the face: then never enlarged more
    than --max-upscale (2); no loose PNG copies beside the bundle by default."""
    sizes = []
    for name, fm in faceset_manifests(swap.out, swap.manifest).items():
        assert not list((swap.out / name).glob("*.png")), name
        for r in fm["pngs"]:
            seen = looker.look(png(swap.out, name, r["file"]))
            assert seen.shape == (r["size"], r["size"], 3), (name, r["file"])
            assert r["size"] <= 512 and r["upscale"] <= 2.0 + 1e-6, (name, r)
            assert r["size"] == 512 or r["upscale"] >= 2.0 - 0.02, (name, r)
            sizes.append(r["size"])
            what = (name, r["file"], r["path"], r["crop_fix"], seen.native, seen.at640)
            # one face in all, and never a second one in either view (a 640 view that
            # misses the face: test_fsz_members_each_show_their_face_to_a_swap_tool)
            assert seen.merged == 1 and seen.native <= 1 and seen.at640 <= 1, what
    # LFW photos are 250 px: many of their faces cannot fill 512 px without inventing detail
    assert 512 in sizes and min(sizes) < 512, sorted(set(sizes))


# ---------------------------------------------------------------------------- bundles
def roop_load(looker, path):
    """A faceset as roop-unleashed builds it from an .fsz: every top-level .png member
    decoded, every face in it detected (640x640, score 0.5) and embedded; returns
    ({member: faces found}, L2-normalised mean embedding of all faces)."""
    found, embs = {}, []
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.endswith(".png") and "/" not in name:
                seen = looker.look(z.read(name))
                found[name] = len(seen.emb)
                embs += list(seen.emb)
    mean = np.mean(embs, axis=0)
    return found, mean / np.linalg.norm(mean)


def bundles(swap):
    for e in swap.manifest["facesets"]:
        cen = np.load(swap.out / e["embedding"])
        for kind in ("top", "all"):
            yield e["name"], swap.out / e["bundles"][kind], cen


def test_fsz_mean_embedding_matches_the_faceset_centroid(swap, looker):
    for name, path, cen in bundles(swap):
        assert abs(np.linalg.norm(cen) - 1) < 1e-4
        found, mean = roop_load(looker, path)
        assert found and sum(found.values()) > 0, (path.name, found)
        two = {m: n for m, n in found.items() if n > 1}
        assert not two, (path.name, two)                 # never a second face in a member
        assert 1 - float(mean @ cen) <= 0.3, (path.name, 1 - float(mean @ cen))


def test_fsz_members_each_show_their_face_to_a_swap_tool(swap, looker):
    missed = {}
    for name, path, _ in bundles(swap):
        found, _ = roop_load(looker, path)
        missed.update({f"{path.name}:{m}": n for m, n in found.items() if n == 0})
    assert not missed, missed


def test_fsz_layout_and_top_bundle(swap):
    for name, fm in faceset_manifests(swap.out, swap.manifest).items():
        ranked = [r["file"] for r in sorted(fm["pngs"], key=lambda r: r["rank"])]
        e = next(e for e in swap.manifest["facesets"] if e["name"] == name)
        # a top-30 bundle is written only when it differs from the whole set
        top = f"{name}/{name}_top30.fsz" if len(ranked) > 30 else f"{name}/{name}_all.fsz"
        assert e["bundles"] == {"top": top, "all": f"{name}/{name}_all.fsz"}
        assert (swap.out / name / f"{name}_top30.fsz").exists() == (len(ranked) > 30)
        for kind, want in (("all", ranked), ("top", ranked[:30])):
            with zipfile.ZipFile(swap.out / e["bundles"][kind]) as z:
                names = z.namelist()
                assert names == want, (name, kind)
                for info in z.infolist():
                    assert "/" not in info.filename and info.filename == info.filename.lower()
                    assert info.filename.endswith(".png")
                    assert z.read(info) == png(swap.out, name, info.filename)
        assert len(want) == min(30, len(ranked))


def test_top_bundle_holds_the_best_n(swap):
    """With --top-n below the faceset size the top bundle is the n best, in rank order."""
    m = json.loads((swap.ref / "refine_manifest.json").read_text())
    m["facesets"] = [min(m["facesets"], key=lambda f: len(f["faces"]))]
    man = swap.tmp / "small" / "refine_manifest.json"
    man.parent.mkdir()
    man.write_text(json.dumps(m))
    out = swap.tmp / "top3"
    run(swap.tmp, "export-swap", swap.cache_path, man, out, "--min-face-short", "40",
        "--top-n", "3")
    name = m["facesets"][0]["name"]
    fm = json.loads((out / name / "manifest.json").read_text())
    assert len(fm["pngs"]) > 3
    with zipfile.ZipFile(out / name / f"{name}_top3.fsz") as z:
        assert z.namelist() == [f"{name}_{k:04d}.png" for k in (1, 2, 3)]
    with zipfile.ZipFile(out / name / f"{name}_all.fsz") as z:
        assert len(z.namelist()) == len(fm["pngs"])
    # the same faceset in the main export: the same crops
    assert fsz_digests(out)[f"{name}/{name}_all.fsz"] == swap.first[f"{name}/{name}_all.fsz"]


def test_ranks_follow_the_documented_composite_quality(swap):
    W = sort_faces.QUALITY_WEIGHTS
    assert abs(sum(W.values()) - 1) < 1e-9
    c = swap.cache
    for name, fm in faceset_manifests(swap.out, swap.manifest).items():
        pngs = fm["pngs"]
        assert [r["rank"] for r in pngs] == list(range(1, len(pngs) + 1))
        assert [r["file"] for r in pngs] == [f"{name}_{k:04d}.png"
                                             for k in range(1, len(pngs) + 1)]
        totals = [r["quality"]["total"] for r in pngs]
        assert totals == sorted(totals, reverse=True), (name, totals)
        for r in pngs:
            q = r["quality"]
            assert abs(q["total"] - sum(w * q[k] for k, w in W.items())) <= 1e-3, (name, q)
            assert all(0 <= q[k] <= 1 for k in W)
            # each component as the README defines it, from the cached face
            (i,) = swap.index.find(sort_faces.record_keys([r]))
            pitch, yaw, _ = c.face_pose[i]
            want = {"frontality": 1 - min(1, np.hypot(yaw, pitch) / 60),
                    "det_score": np.clip((c.face_det_score[i] - 0.5) / 0.5, 0, 1),
                    "symmetry": sort_faces.landmark_symmetry(c.face_lmk106[i]),
                    "size": np.clip(np.log2(c.face_short[i] / 64) / 3, 0, 1),
                    "sharpness": np.clip((np.log10(c.face_blur[i]) - 1) / 2, 0, 1)}
            for k, v in want.items():
                assert abs(q[k] - float(v)) <= 1e-3, (name, r["file"], k, q[k], float(v))


# ---------------------------------------------------------------------------- group photos
def test_group_photo_crop_holds_only_the_intended_face(swap, looker):
    """Each face of group photos exported as its own one-face faceset (and any group-photo
    face the main export holds): the crop shows exactly one face, and it is that face."""
    c = swap.cache
    wanted = []                                   # (PNG path, cache face index)
    for name, fm in faceset_manifests(swap.out, swap.manifest).items():
        for r in fm["pngs"]:
            (i,) = swap.index.find(sort_faces.record_keys([r]))
            if "/groups/" in r["path"] and c.file_n_faces[c.face_file[i]] >= 2:
                wanted.append((png(swap.out, name, r["file"]), i))
    result = sort_faces.Result("refine", c, {})
    facesets = []
    for photo in GROUP_PHOTOS:
        f = c.by_path[str(DATA / "groups" / photo)]
        assert c.file_n_faces[f] >= 3
        for i in np.flatnonzero(c.face_file == f):
            facesets.append({"name": f"faceset_{len(facesets) + 1:03d}",
                             "faces": [result.record(i)]})
    m = json.loads((swap.ref / "refine_manifest.json").read_text())
    m["facesets"] = facesets
    man = swap.tmp / "groups_ref" / "refine_manifest.json"
    man.parent.mkdir()
    man.write_text(json.dumps(m))
    out = swap.tmp / "groups_out"
    run(swap.tmp, "export-swap", swap.cache_path, man, out, "--min-face-short", "40")
    fixes = []
    for fs in facesets:
        fm = json.loads((out / fs["name"] / "manifest.json").read_text())
        assert len(fm["pngs"]) == 1, (fs["faces"][0], fm["dropped"])
        fixes.append(fm["pngs"][0]["crop_fix"])
        wanted.append((png(out, fs["name"], fm["pngs"][0]["file"]),
                       int(swap.index.find(sort_faces.record_keys(fs["faces"]))[0])))
    assert len(wanted) >= 9
    # some crops had to be tightened or other faces blurred away
    assert any(fix.startswith(("padding", "blurred")) for fix in fixes), fixes
    for data, i in wanted:
        seen = looker.look(data)
        what = (str(c.file_path[c.face_file[i]]), i)
        assert seen.merged == seen.native == seen.at640 == 1, (what, seen)
        same_photo = np.flatnonzero(c.face_file == c.face_file[i])
        d = 1 - c.face_emb[same_photo] @ seen.emb[0]
        assert d[same_photo == i][0] < 0.4, (what, d)
        assert same_photo[d.argmin()] == i, (what, d)  # nearer to it than to its neighbours


# ---------------------------------------------------------------------------- re-runs
def test_second_run_gives_byte_identical_bundles(swap):
    assert len(swap.first) == len({b for e in swap.manifest["facesets"]
                                   for b in e["bundles"].values()})
    assert fsz_digests(swap.out) == swap.first


def test_candidates_only_with_the_flag(swap):
    assert not swap.first_candidates                   # the first run had no --candidates
    cands = swap.manifest["candidates"]
    assert sum(map(len, cands.values())) >= 1
    names = {e["name"] for e in swap.manifest["facesets"]}
    on_disk = {(p.parent.name, p.name) for p in (swap.out / "_candidates").glob("*/*.png")}
    assert on_disk == {(n, r["file"]) for n, rs in cands.items() for r in rs}
    for n, rs in cands.items():
        assert n in names
        for r in rs:
            assert r["distance"] <= sort_faces.pack_threshold(swap.cache, "candidate")
            assert r["quality"] >= sort_faces.CANDIDATE_MIN_SCORE


def test_candidates_without_raw_manifest_is_one_line(swap, capsys):
    out = swap.tmp / "no_raw"
    rc, err = run_err(swap.tmp, capsys, "export-swap", *swap.args[:2], out, "--candidates")
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error:") and "--raw-manifest" in err[0], err
    assert not out.exists()


def test_out_with_a_foreign_file(swap, capsys):
    """An OUT holding only a user's files is refused, with or without --clean; a user's
    file added to an export-swap OUT is left alone by re-runs and by --clean."""
    out = swap.tmp / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--clean"]):
        rc, err = run_err(swap.tmp, capsys, "export-swap", *swap.args[:2], out,
                          "--min-face-short", "40", *extra)
        assert rc == 1
        assert len(err) == 1 and err[0].startswith("error:") and "notes.txt" in err[0], err
        assert os.listdir(out) == ["notes.txt"]
    # one of ours, with the user's notes at the top and inside a faceset folder
    small = swap.tmp / "small_clean" / "refine_manifest.json"
    m = json.loads((swap.ref / "refine_manifest.json").read_text())
    m["facesets"] = m["facesets"][-1:]
    small.parent.mkdir()
    small.write_text(json.dumps(m))
    out = swap.tmp / "ours"
    args = ["export-swap", swap.cache_path, small, out, "--min-face-short", "40"]
    run(swap.tmp, *args)
    name = m["facesets"][0]["name"]
    (out / "notes.txt").write_text("mine")
    (out / name / "NOTES.txt").write_text("about this person")
    run(swap.tmp, *args)
    run(swap.tmp, *args, "--clean")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / name / "NOTES.txt").read_text() == "about this person"
    assert (out / name / f"{name}_all.fsz").is_file()


def test_refine_manifest_of_another_cache_is_refused(swap, capsys):
    other = swap.tmp / "other.npz"
    shutil.copy(swap.cache_path, other)
    out = swap.tmp / "other_out"
    rc, err = run_err(swap.tmp, capsys, "export-swap", other, swap.args[1], out,
                      "--min-face-short", "40")
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert str(swap.cache_path) in err[0] and "made from cache" in err[0]
    assert not out.exists()


def test_a_png_in_the_bundle_can_be_rejected_by_name(swap, capsys):
    """PNGs live in the bundle only: `reject OUT/faceset_NNN/faceset_NNN_0002.png` still
    names that face (and undo takes it back); a name the faceset has not is refused."""
    e = swap.manifest["facesets"][0]
    png_path = swap.out / e["path"] / f"{e['name']}_0002.png"
    assert not png_path.exists()
    people = swap.tmp / "mixed.npz.people.json"
    try:
        run(swap.tmp, "reject", swap.cache_path, png_path)
        data = json.loads(people.read_text())
        r = next(f for f in e["faces"] if f["png"] == png_path.name)
        assert data["rejected"] == [sort_faces.face_id(r["sha256"], r["bbox"])]
        rc, err = run_err(swap.tmp, capsys, "reject", swap.cache_path,
                          swap.out / e["path"] / "nothing_here.png")
        assert rc == 1 and len(err) == 1 and "no such file" in err[0], err
    finally:
        if people.exists():
            run(swap.tmp, "undo", swap.cache_path)
            assert json.loads(people.read_text())["rejected"] == []


@pytest.mark.parametrize("flag", [["--max-upscale", "0"], ["--out-size", "-5"],
                                  ["--pad-ratio", "x"], ["--top-n", "0"]])
def test_export_flags_out_of_range_are_refused(swap, flag, capsys):
    out = swap.tmp / "flags"
    with pytest.raises(SystemExit) as stop:
        main(swap.tmp, "export-swap", *swap.args[:2], out, *flag)
    assert stop.value.code == 2 and flag[0] in capsys.readouterr().err
    assert not out.exists()
