"""A folder name names the same person for good: cluster, refine, extend and export-swap
number people from one identities file beside the cache, across fresh runs (--clean) and
new photos; new people take numbers never used; the file is checked where it is read."""
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import sort_faces
from conftest import DATA, requires_data

PEOPLE = ("Tony_Blair", "Hugo_Chavez", "Naomi_Watts", "Madonna")
NEW = "Jerry_Seinfeld"          # joins later, larger than anyone
LATER = "Elton_John"            # comes in through extend
SMALL = ["--min-face-short", "40"]        # the labeled faces are small (LFW, 250 px)


def run(tmp, *args):
    assert sort_faces.main([*map(str, args), "-q", "--log-dir", str(tmp / "logs")]) == 0


def who(faces):
    """The person most faces of a manifest group come from (their labeled/ folder), and
    whether all of them do."""
    names = Counter(Path(f["path"]).parent.name for f in faces)
    top, n = names.most_common(1)[0]
    return top, n == len(faces)


def people_of(manifest, key):
    """{folder name: person} of a manifest's groups; each group is one person."""
    out = {}
    for g in manifest[key]:
        person, pure = who(g["faces"])
        assert pure, (g["name"], Counter(Path(f["path"]).parent.name for f in g["faces"]))
        out[g["name"]] = person
    return out


def outputs(home):
    raw = json.loads((home / "raw" / "manifest.json").read_text())
    ref = json.loads((home / "ref" / "refine_manifest.json").read_text())
    swap = json.loads((home / "swap" / "manifest.json").read_text())
    return people_of(raw, "clusters"), people_of(ref, "facesets"), people_of(swap, "facesets")


def steps(home, clean=()):
    cache = home / "c.npz"
    run(home, "cluster", cache, home / "raw", *clean)
    run(home, "refine", cache, home / "ref", "--min-faces", "4", *SMALL, *clean)
    run(home, "enrich", cache)
    run(home, "export-swap", cache, home / "ref" / "refine_manifest.json", home / "swap",
        *SMALL)


pytestmark = requires_data


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Half the photos of four people through every step; then the other half and a new,
    larger person, with cluster --clean and refine --clean (what the review page advised)."""
    home = tmp_path_factory.mktemp("identity")
    first, second = home / "first", home / "second"
    for person in PEOPLE:
        photos = sorted((DATA / "labeled" / person).glob("*.jpg"))
        for k, p in enumerate(photos):
            dst = (first if k % 2 == 0 else second) / person / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
    shutil.copytree(DATA / "labeled" / NEW, second / NEW)
    run(home, "embed", first, home / "c.npz")
    steps(home)
    before = outputs(home)
    run(home, "embed", second, home / "c.npz")
    steps(home, ["--clean"])
    return home, before, outputs(home)


def test_every_folder_keeps_its_person_after_fresh_runs(home):
    _, before, after = home
    for old, new in zip(before, after):
        assert sorted(old.values()) == sorted(PEOPLE)
        for name, person in old.items():
            assert new.get(name) == person, (name, person, new)


def test_one_person_has_one_number_in_every_output(home):
    _, _, (raw, ref, swap) = home
    number = lambda names: {p: n.split("_")[1] for n, p in names.items()}
    assert number(raw) == number(ref) == number(swap)
    # the newcomer is the largest person but takes the next number, never an earlier one
    assert number(raw)[NEW] == "005"


def test_extend_gives_a_new_person_one_new_number_in_both_outputs(home, tmp_path):
    src, _, _ = home
    h = tmp_path
    for name in ("c.npz", "c.npz.identities.npz"):
        shutil.copy2(src / name, h / name)
    for out in ("raw", "ref"):
        shutil.copytree(src / out, h / out, symlinks=True)
    # the outputs name their cache: re-made here from the copy so extend accepts them
    run(h, "cluster", h / "c.npz", h / "raw", "--clean")
    run(h, "refine", h / "c.npz", h / "ref", "--min-faces", "4", *SMALL, "--clean")
    shutil.copytree(DATA / "labeled" / LATER, h / "later" / LATER)
    run(h, "embed", h / "later", h / "c.npz")
    run(h, "extend", h / "c.npz", h / "raw", "--refine-out", h / "ref")
    raw = people_of(json.loads((h / "raw" / "manifest.json").read_text()), "clusters")
    ref = people_of(json.loads((h / "ref" / "refine_manifest.json").read_text()), "facesets")
    assert {n for n, p in raw.items() if p == LATER} == {"person_006"}
    assert {n for n, p in ref.items() if p == LATER} == {"faceset_006"}
    for name, person in raw.items():                   # no one else moved
        assert person == LATER or name != "person_006"
    # each new face was placed once: in refine, only into the faceset of the person raw
    # put it in (same number), and never out of one of raw's singletons
    raw_m = json.loads((h / "raw" / "manifest.json").read_text())
    ref_m = json.loads((h / "ref" / "refine_manifest.json").read_text())
    where = {(f["sha256"], tuple(f["bbox"])): c["name"][len("person_"):]
             for c in raw_m["clusters"] for f in c["faces"]}
    added = [(fs["name"][len("faceset_"):], f) for fs in ref_m["facesets"] for f in fs["faces"]
             if f.get("added_by_extend")]
    assert added
    for number, f in added:
        assert where.get((f["sha256"], tuple(f["bbox"]))) == number, (number, f["path"])


def test_a_lost_identities_file_is_rebuilt_from_the_output_it_replaces(home, tmp_path):
    src, _, (raw, _, _) = home
    h = tmp_path
    shutil.copy2(src / "c.npz", h / "c.npz")
    run(h, "cluster", h / "c.npz", h / "raw")
    first = people_of(json.loads((h / "raw" / "manifest.json").read_text()), "clusters")
    # the file beside the cache is gone; the output still says who is who
    (h / "c.npz.identities.npz").unlink()
    man = json.loads((h / "raw" / "manifest.json").read_text())
    for c in man["clusters"]:                         # pretend an older run numbered so
        c["name"] = {"person_001": "person_009", "person_009": "person_001"}.get(c["name"],
                                                                                 c["name"])
    (h / "raw" / "manifest.json").write_text(json.dumps(man))
    run(h, "cluster", h / "c.npz", h / "raw", "--clean")
    again = people_of(json.loads((h / "raw" / "manifest.json").read_text()), "clusters")
    want = {({"person_001": "person_009"}.get(n, n)): p for n, p in first.items()}
    assert again == want


# ---------------------------------------------------------------------------- the rule
def keys(*names):
    """Face keys of made-up faces: one photo per name."""
    return sort_faces.face_keys([f"{ord(n[0]):064x}" for n in names],
                                     [[0, 0, 10 * len(n), 10] for n in names])


def test_numbers_follow_the_faces_and_are_never_given_again():
    ids = sort_faces.Identities(np.zeros(0, "S96"), np.zeros(0, np.int64))
    a, b, c = keys("a", "aa", "aaa"), keys("b", "bb"), keys("c")
    nums, ids = ids.assign([b, a, c])
    assert nums == [2, 1, 3] and ids.next == 4                # fresh: largest first
    # b's faces split off a newcomer, a is gone, c grew: b keeps 2, c keeps 3, d is new
    d = keys("d", "dd", "ddd", "dddd")
    nums, ids = ids.assign([np.concatenate([c, keys("cc")]), d, b[:1], b[1:]])
    assert nums[0] == 3 and nums[2] == 2 and sorted(nums[1::2]) == [4, 5]
    nums, ids = ids.assign([a])                               # a is back
    assert nums == [1]


def test_a_number_in_use_is_not_given_to_an_extension():
    ids = sort_faces.Identities(np.zeros(0, "S96"), np.zeros(0, np.int64))
    a = keys("a", "aa")
    _, ids = ids.assign([a])
    nums, _ = ids.assign([a], taken=[1])
    assert nums == [2]


@pytest.mark.parametrize("damage", ["schema", "next", "numbers", "unsorted", "text"])
def test_a_damaged_identities_file_is_one_error_line(tmp_path, capsys, damage, labeled_cache):
    cache = tmp_path / "c.npz"
    shutil.copy2(labeled_cache, cache)
    path = Path(sort_faces.identities_path(cache))
    k = keys("a", "bb", "ccc")
    meta, numbers = {"schema": 1, "next": 4}, np.array([1, 2, 3])
    if damage == "schema":
        meta["schema"] = 7
    elif damage == "next":
        meta["next"] = "x"
    elif damage == "numbers":
        numbers = np.array([1, 2, 9])
    elif damage == "unsorted":
        k = k[::-1]
    if damage == "text":
        path.write_text("not an npz")
    else:
        sort_faces._write_npz(str(path), meta, {"keys": k, "numbers": numbers})
    capsys.readouterr()
    rc = sort_faces.main(["cluster", str(cache), str(tmp_path / "out"), "-q",
                          "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(path) in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_truncated_identities_file_is_one_error_line(tmp_path, capsys, labeled_cache):
    cache = tmp_path / "c.npz"
    shutil.copy2(labeled_cache, cache)
    sort_faces._write_npz(sort_faces.identities_path(cache), {"schema": 1, "next": 2},
                          {"keys": keys("a"), "numbers": np.array([1])})
    path = Path(sort_faces.identities_path(cache))
    path.write_bytes(path.read_bytes()[:40])
    capsys.readouterr()
    assert sort_faces.main(["cluster", str(cache), str(tmp_path / "out"), "-q",
                            "--log-dir", str(tmp_path / "logs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and "Traceback" not in err[0]


# ---------------------------------------------------------------------------- property
SEQ_PEOPLE = ("Tony_Blair", "Hugo_Chavez", "Naomi_Watts", "Madonna", "Elton_John")


@pytest.mark.parametrize("seed", [1, 2])
def test_random_sequences_never_give_a_folder_to_someone_else(tmp_path, seed):
    """Random sequences of embed (more photos), cluster --clean, refine --clean, extend,
    export-swap, name, reject and undo: a folder name, once it holds a person, never holds
    another one, in any output; and number NNN is one person in all of them."""
    rng = np.random.default_rng(seed)
    home, cache = tmp_path, tmp_path / "c.npz"
    batches = [home / f"batch{b}" for b in range(3)]
    for person in SEQ_PEOPLE:
        for k, p in enumerate(sorted((DATA / "labeled" / person).glob("*.jpg"))):
            dst = batches[k % 3] / person / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
    ran = []
    whose = {}                   # (output, folder name) -> person it first held
    number_of = {}               # NNN -> person, across all outputs

    def check():
        for out, mname, key in (("raw", "manifest.json", "clusters"),
                                ("ref", "refine_manifest.json", "facesets"),
                                ("swap", "manifest.json", "facesets")):
            path = home / out / mname
            if not path.exists():
                continue
            for g in json.loads(path.read_text())[key]:
                if not g.get("faces"):
                    continue
                person, _ = who(g["faces"])
                assert whose.setdefault((out, g["name"]), person) == person, (ran, out, g)
                num = g["name"].rsplit("_", 1)[-1]
                if not g.get("person") and num.isdigit():
                    assert number_of.setdefault(num, person) == person, (ran, out, g)

    def embed():
        if batches:
            run(home, "embed", batches.pop(0), cache)

    def cluster():
        run(home, "cluster", cache, home / "raw", "--clean")

    def refine():
        run(home, "refine", cache, home / "ref", "--min-faces", "3", *SMALL, "--clean")

    def extend():
        if (home / "raw").exists() and (home / "ref").exists():
            run(home, "extend", cache, home / "raw", "--refine-out", home / "ref")

    def swap():
        if (home / "ref").exists():
            run(home, "enrich", cache)
            run(home, "export-swap", cache, home / "ref" / "refine_manifest.json",
                home / "swap", *SMALL)

    def name():
        if (home / "raw").exists():
            m = json.loads((home / "raw" / "manifest.json").read_text())
            unnamed = [c for c in m["clusters"] if not c.get("person")]
            if unnamed:
                c = unnamed[int(rng.integers(len(unnamed)))]
                sort_faces.main(["name", str(cache), str(home / "raw" / c["name"]),
                                 f"Who{len(ran)}", "-q", "--log-dir", str(home / "logs")])

    def reject():
        if (home / "raw").exists():
            m = json.loads((home / "raw" / "manifest.json").read_text())
            faces = [(c["name"], f["file"]) for c in m["clusters"] for f in c["faces"]]
            if faces:
                folder, file = faces[int(rng.integers(len(faces)))]
                run(home, "reject", cache, home / "raw" / folder / file)

    def undo():
        sort_faces.main(["undo", str(cache), "-q", "--log-dir", str(home / "logs")])

    ops = {"embed": embed, "cluster": cluster, "refine": refine, "extend": extend,
           "swap": swap, "name": name, "reject": reject, "undo": undo}
    plan = ["embed", "cluster", "refine"] + list(rng.choice(sorted(ops), 9)) \
        + ["embed", "embed", "cluster", "refine", "swap"]
    for op in plan:
        ran.append(op)
        ops[op]()
        check()
    assert sorted(set(whose.values())) == sorted(SEQ_PEOPLE)


def test_refine_builds_on_the_people_cluster_found(home, tmp_path):
    """refine takes cluster's people as they are, under the rule cluster used: with its
    gates open, its facesets are exactly cluster's people and singletons, also when cluster
    was run with a rule of its own; a refine given its own rule finds its own people."""
    src, _, _ = home
    h = tmp_path
    shutil.copy2(src / "c.npz", h / "c.npz")
    tight = ["--threshold", "0.45", "--join-threshold", "0"]
    run(h, "cluster", h / "c.npz", h / "raw", *tight)
    open_gates = ["--min-faces", "1", "--min-face-short", "0", "--min-blur", "0",
                  "--min-det-score", "0", "--outlier-threshold", "2"]
    run(h, "refine", h / "c.npz", h / "ref", *open_gates)
    raw = json.loads((h / "raw" / "manifest.json").read_text())
    ref = json.loads((h / "ref" / "refine_manifest.json").read_text())
    face = lambda f: (f["sha256"], tuple(f["bbox"]))
    people = {frozenset(map(face, c["faces"])) for c in raw["clusters"]}
    people |= {frozenset([face(f)]) for f in raw["singletons"]}
    assert {frozenset(map(face, fs["faces"])) for fs in ref["facesets"]} == people
    # the tight rule is not the pack's: refine with the pack's own rule finds fewer people
    run(h, "refine", h / "c.npz", h / "ref2", *open_gates, "--initial-threshold", "0.60",
        "--join-threshold", "0.76")
    ref2 = json.loads((h / "ref2" / "refine_manifest.json").read_text())
    assert len(ref2["facesets"]) < len(ref["facesets"])
    # a damaged identity-step file only costs the computation (and with it, cluster's
    # rule: refine is then given it)
    step = Path(str(h / "c.npz") + ".identity_step.npz")
    for damage in (b"not an npz", step.read_bytes()[:100]):
        step.write_bytes(damage)
        run(h, "refine", h / "c.npz", h / "ref", *open_gates, "--clean",
            "--initial-threshold", "0.45", "--join-threshold", "0")
        again = json.loads((h / "ref" / "refine_manifest.json").read_text())
        assert {frozenset(map(face, fs["faces"])) for fs in again["facesets"]} == people
