"""One face seen twice is one face: copies of real photos turned by their pixels (not by
EXIF), mirrored, re-saved and re-scaled are embedded like their original, exported once,
upright, and reported by dedup."""
import json
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import DATA, requires_data
import sort_faces

pytestmark = requires_data

PERSON = "Mindy_Kaling"
ORIGINALS = 12          #: photos of PERSON in the set
WITH_COPIES = 6         #: of which this many get every kind of copy


def make_copies(src, dst):
    """{original name: [its copies' names]}: each kind of copy a user's library holds."""
    import cv2
    dst.mkdir(parents=True)
    groups = {}
    for k, photo in enumerate(sorted(src.glob("*.jpg"))[:ORIGINALS]):
        img = cv2.imread(str(photo))
        cv2.imwrite(str(dst / photo.name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if k >= WITH_COPIES:
            continue
        h, w = img.shape[:2]
        copies = {"cw": np.rot90(img, 3), "ccw": np.rot90(img, 1), "mirror": img[:, ::-1],
                  "resaved": img, "scaled": cv2.resize(img, (w * 4 // 5, h * 4 // 5),
                                                       interpolation=cv2.INTER_AREA)}
        names = []
        for kind, copy in copies.items():
            name = f"{photo.stem}_{kind}.jpg"
            quality = 60 if kind == "resaved" else 95
            cv2.imwrite(str(dst / name), np.ascontiguousarray(copy),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])
            names.append(name)
        groups[photo.name] = names
    return groups


def main(tmp, *args):
    assert sort_faces.main([*map(str, args), "-q", "--log-dir", str(tmp / "logs")]) == 0


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("copies")
    src = tmp / "photos"
    groups = make_copies(DATA / "labeled" / PERSON, src / PERSON)
    cache = tmp / "c.npz"
    main(tmp, "embed", src, cache)
    main(tmp, "enrich", cache)
    main(tmp, "refine", cache, tmp / "ref", "--min-short", "40", "--min-faces", "4")
    main(tmp, "export-swap", cache, tmp / "ref" / "refine_manifest.json", tmp / "swap",
         "--min-face-short", "40")
    main(tmp, "dedup", cache, "--out", tmp / "dups.json")
    c = sort_faces.load_cache(cache)
    face_of = {}                       # photo name -> its one face (photos with one face)
    for f, path in enumerate(c.file_path.tolist()):
        faces = np.flatnonzero(c.face_file == f)
        if len(faces) == 1:
            face_of[path.rsplit("/", 1)[1]] = int(faces[0])
    return SimpleNamespace(tmp=tmp, src=src / PERSON, cache=c, groups=groups, face_of=face_of,
                           swap=json.loads((tmp / "swap" / "manifest.json").read_text()),
                           dups=json.loads((tmp / "dups.json").read_text()))


def found_copies(copies, kinds=("cw", "ccw", "mirror", "resaved", "scaled")):
    """(original, copy) pairs where the detector found the face in both."""
    return [(o, n) for o, names in copies.groups.items() for n in names
            if o in copies.face_of and n in copies.face_of and n.rsplit("_", 1)[1][:-4] in kinds]


def test_a_turned_copy_is_embedded_like_its_original(copies):
    """Sideways faces are detected again upright: their embedding is the original's."""
    c, pairs = copies.cache, found_copies(copies, ("cw", "ccw"))
    assert len(pairs) >= 3, pairs            # the detector finds most of these sideways
    for o, n in pairs:
        d = 1 - float(c.face_emb[copies.face_of[o]] @ c.face_emb[copies.face_of[n]])
        assert d < 0.05, (o, n, d)
        roll = float(sort_faces.face_roll(c.face_kps[copies.face_of[n]]))
        assert 60 < abs(roll) < 120, (n, roll)


def test_each_face_is_exported_once_and_upright(copies):
    """The faceset holds one PNG per original, whichever copy ranked best; each PNG's face
    stands upright (its eye line within 20 degrees of level)."""
    (entry,) = copies.swap["facesets"]
    fm = json.loads((copies.tmp / "swap" / entry["path"] / "manifest.json").read_text())
    name_of = lambda r: r["path"].rsplit("/", 1)[1]
    exported = [name_of(r) for r in fm["pngs"]]
    owner = {n: o for o, names in copies.groups.items() for n in [o, *names]}
    per_original = {}
    for n in exported:
        per_original.setdefault(owner.get(n, n), []).append(n)
    assert all(len(v) == 1 for v in per_original.values()), per_original
    collapsed = [d for d in fm["dropped"] if d["gate"] == "near_duplicate"]
    assert len(collapsed) >= len(found_copies(copies)) - 1, collapsed
    det = sort_faces.swap_models(copies.cache)
    import cv2
    with zipfile.ZipFile(copies.tmp / "swap" / entry["bundles"]["all"]) as z:
        for r in fm["pngs"]:
            img = cv2.imdecode(np.frombuffer(z.read(r["file"]), np.uint8), cv2.IMREAD_COLOR)
            _, kps = det.detect(img, input_size=(640, 640), det_thresh=0.5)
            assert len(kps) == 1, r["file"]
            assert abs(float(sort_faces.face_roll(kps[0]))) < 20, (r["file"], r["path"])


def test_dedup_groups_every_copy_with_its_original(copies):
    """Turned copies, which whole-image hashes cannot see, are found by their faces; no
    two originals share a group."""
    groups = [{f["path"].rsplit("/", 1)[1] for f in g["files"]} for g in copies.dups["near"]]
    for o, n in found_copies(copies):
        assert any({o, n} <= g for g in groups), (o, n, groups)
    originals = {n for n in copies.face_of if n.count("_") == 2}      # Mindy_Kaling_0001.jpg
    for g in groups:
        assert len(g & originals) <= 1, g
    turned = [link for g in copies.dups["near"] for link in g["links"]
              if link["match"] == "faces"]
    assert turned and all(link["face_distance"] <= sort_faces.DUP_FACE_DISTANCE
                          and link["turned"] in (90, 180, 270) for link in turned)
    # every turned copy the detector found is linked to its original by its faces
    # (turned: counter-clockwise degrees that take photo a to photo b)
    for o, n in found_copies(copies, ("cw", "ccw")):
        ccw = 90 if n.endswith("_ccw.jpg") else 270
        want = {(str(copies.src / o), str(copies.src / n)): ccw,
                (str(copies.src / n), str(copies.src / o)): 360 - ccw}
        assert any(want.get((link["a"], link["b"])) == link["turned"] for link in turned), (o, n)

