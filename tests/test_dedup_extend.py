"""dedup (byte-identical and visual near-duplicates) and extend (folding in new photos
without renumbering), on real photos."""
import csv
import hashlib
import json
import os
import shutil
from collections import Counter

import pytest
from PIL import Image, ImageOps

from conftest import DATA, requires_data
import sort_faces

pytestmark = requires_data


def run(*args):
    assert sort_faces.main([*map(str, args), "-q"]) == 0


# ----------------------------------------------------------------------------- dedup
@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Six labeled photos, each with resized / recompressed / 5%-cropped / mirrored
    variants, one byte-identical copy, and a different photo of the same person."""
    src = tmp_path_factory.mktemp("variants") / "src"
    src.mkdir()
    bases = ["Elton_John/Elton_John_0003.jpg", "Madonna/Madonna_0002.jpg",
             "Hugo_Chavez/Hugo_Chavez_0013.jpg", "Mindy_Kaling/Mindy_Kaling_0004.jpg",
             "Ben_Affleck/Ben_Affleck_0002.jpg", "Tony_Blair/Tony_Blair_0063.jpg"]
    groups = []
    for rel in bases:
        im = Image.open(DATA / "labeled" / rel).convert("RGB")
        stem = os.path.splitext(os.path.basename(rel))[0]
        w, h = im.size
        made = {f"{stem}.jpg": im, f"{stem}_resized.jpg": im.resize((w * 2 // 3, h * 2 // 3)),
                f"{stem}_crop.jpg": im.crop((int(w * .05), int(h * .05), w, h)),
                f"{stem}_mirror.jpg": ImageOps.mirror(im)}
        for name, img in made.items():
            img.save(src / name, quality=92)
        im.save(src / f"{stem}_recomp.jpg", quality=40)
        groups.append({p.name for p in src.glob(f"{stem}*")})
    shutil.copy(src / "Madonna_0002.jpg", src / "Madonna_0002 (copy).jpg")
    groups[1].add("Madonna_0002 (copy).jpg")
    # other photos of people above: must stay out of every group
    others = ["Elton_John/Elton_John_0004.jpg", "Madonna/Madonna_0003.jpg",
              "Tony_Blair/Tony_Blair_0065.jpg"]
    for rel in others:
        shutil.copy(DATA / "labeled" / rel, src / os.path.basename(rel))
    cache = src.parent / "c.npz"
    run("embed", src, cache)
    run("dedup", cache)
    report = json.loads((src.parent / "c.duplicates.json").read_text())
    return src, groups, [os.path.basename(p) for p in others], report


def test_byte_identical_groups(variants):
    src, _, _, report = variants
    ident = report["identical"]
    assert len(ident) == 1
    assert sorted(map(os.path.basename, ident[0]["paths"])) == ["Madonna_0002 (copy).jpg",
                                                                 "Madonna_0002.jpg"]
    assert report["summary"]["identical_bytes_saved"] == ident[0]["size"] > 0


def test_variants_grouped_other_photos_not(variants):
    src, groups, others, report = variants
    found = [{os.path.basename(p) for f in g["files"] for p in [f["path"], *f["aliases"]]}
             for g in report["near"]]
    for want in groups:
        best = max(found, key=lambda g: len(g & want), default=set())
        # the 5% crop is the hardest variant: allow it alone to be missed
        assert len(best & want) >= len(want) - 1 and best <= want, (want, best)
    for name in others:
        assert not any(name in g for g in found), name
    for g in report["near"]:
        for link in g["links"]:
            assert link["match"] == "faces" or 0 <= link["hamming"] <= 16, link
        assert g["keep"] in {f["path"] for f in g["files"]}


def test_dedup_never_touches_files(variants, tree_digest):
    src, *_ = variants
    before = tree_digest(src)
    run("dedup", src.parent / "c.npz")
    assert tree_digest(src) == before


# ----------------------------------------------------------------------------- extend
def _halves(tmp):
    """Odd-numbered photos of every person into a/, even-numbered into b/."""
    a, b = tmp / "a", tmp / "b"
    for person in sorted(p for p in (DATA / "labeled").iterdir() if p.is_dir()):
        for k, photo in enumerate(sorted(person.glob("*.jpg"))):
            dst = (a if k % 2 == 0 else b) / person.name
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, dst / photo.name)
    return a, b


def _identity_of(cache):
    """cache face index -> identity, for the labeled face of each copied photo."""
    boxes = {row["relpath"]: [float(v) for v in row["labeled_face_box_x1_y1_x2_y2"].split()]
             for row in csv.DictReader(open(DATA / "labeled_faces.csv"))}
    out = {}
    for i in range(cache.n_faces):
        path = str(cache.file_path[cache.face_file[i]])
        rel = "/".join(path.split(os.sep)[-2:])
        box = boxes.get(rel)
        if not box or rel.startswith("distractors/"):
            continue
        if sort_faces.box_iou(cache.face_bbox[i], box) >= sort_faces.SAME_FACE_IOU:
            out[i] = rel.split("/")[0]
    return out


def _snapshot(folder):
    """{relpath: sha256} of every file (the review page and manifest excluded)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel.startswith(("_thumbs", ".sort_faces")) or name in ("index.html", "manifest.json",
                                                      "refine_manifest.json", "_contact.jpg"):
                continue
            out[rel] = hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extend")
    a, b = _halves(tmp)
    cache, raw, ref = tmp / "c.npz", tmp / "raw", tmp / "ref"
    run("embed", a, cache)
    run("cluster", cache, raw)
    run("refine", cache, ref, "--min-short", "40", "--min-faces", "4")
    before = {"raw": json.loads((raw / "manifest.json").read_text()),
              "ref": json.loads((ref / "refine_manifest.json").read_text()),
              "raw_files": _snapshot(raw), "ref_files": _snapshot(ref)}
    run("embed", b, cache)
    run("extend", cache, raw, "--refine-out", ref)
    return tmp, cache, raw, ref, before


def _placement(manifest, key):
    return {(f["sha256"], tuple(f["bbox"])): c["name"] for c in manifest[key] for f in c["faces"]}


@pytest.mark.parametrize("which,key,name", [("raw", "clusters", "manifest.json"),
                                            ("ref", "facesets", "refine_manifest.json")])
def test_extend_moves_nothing_and_places_new_faces(extended, which, key, name):
    tmp, cache_path, raw, ref, before = extended
    out = raw if which == "raw" else ref
    after = json.loads((out / name).read_text())
    old, new = _placement(before[which], key), _placement(after, key)
    assert all(new.get(k) == v for k, v in old.items())         # nobody moved or renumbered
    snap = _snapshot(out)
    assert all(snap.get(k) == v for k, v in before[f"{which}_files"].items())
    names = [c["name"] for c in after[key]]
    assert names[:len(before[which][key])] == [c["name"] for c in before[which][key]]
    # >= 95% of the new labeled faces land with their own person
    cache = sort_faces.load_cache(cache_path)
    ident = _identity_of(cache)
    index = sort_faces.face_index(cache)
    row = lambda k: int(index.find(sort_faces.face_keys([k[0]], [k[1]]))[0])
    owner = {}
    for k, person in new.items():
        i = row(k)
        if i in ident:
            owner.setdefault(person, []).append(ident[i])
    majority = {p: Counter(v).most_common(1)[0][0] for p, v in owner.items()}
    added = [(k, p) for k, p in new.items() if k not in old]
    scored = [(row(k), p) for k, p in added]
    scored = [(i, p) for i, p in scored if i in ident]
    assert len(scored) >= 60
    right = sum(ident[i] == majority[p] for i, p in scored)
    assert right >= 0.95 * len(scored), (right, len(scored))
    assert after["extends"][-1]["faces"] > 0


def test_second_extend_is_a_noop(extended, capsys):
    tmp, cache, raw, ref, _ = extended
    m1 = (raw / "manifest.json").read_bytes(), (ref / "refine_manifest.json").read_bytes()
    capsys.readouterr()
    run("extend", cache, raw, "--refine-out", ref)
    assert "raw: nothing new; refine: nothing new" in capsys.readouterr().out
    assert ((raw / "manifest.json").read_bytes(),
            (ref / "refine_manifest.json").read_bytes()) == m1


def test_extend_refuses_another_cache(extended, tmp_path, capsys):
    tmp, cache, raw, ref, _ = extended
    other = tmp_path / "other.npz"
    shutil.copy(cache, other)
    assert sort_faces.main(["extend", str(other), str(raw), "-q"]) == 1
    assert "was made from cache" in capsys.readouterr().err
    assert sort_faces.main(["extend", str(cache), str(tmp_path / "missing"), "-q"]) == 1
    assert "not found" in capsys.readouterr().err
