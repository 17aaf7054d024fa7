"""The clustering primitives on real embeddings (labeled/ + groups/): each stage of
identities() does what README "How faces become people" says, on both search paths."""
import numpy as np
import pytest

from conftest import labeled_truth, requires_data
import sort_faces

pytestmark = requires_data


@pytest.fixture(scope="module")
def faces(labeled_cache):
    cache = sort_faces.load_cache(labeled_cache)
    truth = labeled_truth(cache)
    return cache, truth


def _partition(labels):
    return sorted(tuple(g.tolist()) for g in sort_faces.labels_to_groups(labels))


def test_stage1_is_average_linkage(faces, monkeypatch):
    """agglomerate() gives scikit-learn's average-linkage clusters on the same faces, and
    nearly so with big clusters absorbing their satellites in batches (the speed-up)."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score
    emb = faces[0].face_emb
    for threshold in (0.45, 0.60, 0.75):
        ref = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                      distance_threshold=threshold).fit_predict(emb)
        assert len(set(ref)) < len(emb)          # the threshold did join faces
        batched = sort_faces.agglomerate(emb, threshold, method="exact")
        assert adjusted_rand_score(ref, batched) >= 0.95, threshold
        with monkeypatch.context() as m:
            m.setattr(sort_faces, "_SATELLITE_TO", len(emb) + 1)
            one_by_one = sort_faces.agglomerate(emb, threshold, method="exact")
        assert _partition(one_by_one) == _partition(ref), threshold


def test_two_faces_of_one_photo_never_share_a_person(faces):
    """Even a rule that would join everyone keeps the faces of a group photo apart."""
    cache, _ = faces
    loose = sort_faces.IdentityRule(pair=1.5, merge=1.5, join=1.5, margin=0.0)
    labels = sort_faces.identities(cache.face_emb, cache.face_file, loose)
    multi = np.flatnonzero(np.bincount(cache.face_file) > 1)
    assert len(multi)
    for f in multi:
        mine = labels[cache.face_file == f]
        assert len(set(mine.tolist())) == len(mine)


def test_the_stages_add_recall_without_merging_people(faces):
    """Stage 1 alone at the pair threshold is precise but splits people; the centroid
    stage and the joining stage bring their faces together and keep people apart."""
    cache, truth = faces
    rule = sort_faces.identity_rule(cache)
    idx = sorted(truth)
    who = np.array([truth[i] for i in idx])

    def purity_and_splits(labels):
        lab = labels[idx]
        mixed = sum(len(set(who[lab == c])) > 1 for c in set(lab.tolist()))
        return mixed, len(set(zip(who.tolist(), lab.tolist())))

    first = sort_faces.agglomerate(cache.face_emb, rule.pair, cache.face_file)
    final = sort_faces.identities(cache.face_emb, cache.face_file, rule)
    mixed1, split1 = purity_and_splits(first)
    mixed2, split2 = purity_and_splits(final)
    assert mixed1 == 0 and mixed2 == 0
    assert split2 < split1
    assert split2 <= len(set(who.tolist())) + 2


def test_a_face_between_two_people_joins_neither(faces):
    """Stage 3 needs a margin: a query as near to two people as to each other stays out."""
    cache, truth = faces
    rule = sort_faces.identity_rule(cache)
    names = sorted({t for t in truth.values() if not t.startswith("distractor")})
    means = np.stack([cache.face_emb[[i for i, t in truth.items() if t == n]].mean(0)
                      for n in names[:2]])
    one = cache.face_emb[[i for i, t in truth.items() if t == names[0]][0]]
    halfway = means.mean(0)
    pick, _ = sort_faces.nearest_person(means, np.stack([one, halfway]), rule)
    assert pick.tolist() == [0, -1]


def test_seeded_people_keep_their_faces_and_stay_apart(faces):
    """extend's frozen seeds: an earlier result's people start merged, never merge with
    each other (even under a rule that joins everyone), and new faces may join them."""
    cache, truth = faces
    idx = np.array(sorted(truth))
    who = np.array([truth[i] for i in idx])
    a, b = sorted(set(who.tolist()) - {w for w in who if w.startswith("distractor")})[:2]
    seeds = np.full(len(cache.face_emb), -1)
    seeds[idx[who == a][:-2]] = 0
    seeds[idx[who == b][:-2]] = 1
    rule = sort_faces.IdentityRule(pair=0.6, merge=1.5, join=0.9, margin=0.0)
    labels = sort_faces.identities(cache.face_emb, cache.face_file, rule, seeds=seeds)
    assert len(set(labels[seeds == 0].tolist())) == 1
    assert len(set(labels[seeds == 1].tolist())) == 1
    assert labels[seeds == 0][0] != labels[seeds == 1][0]
    assert set(labels[idx[who == a]].tolist()) == {labels[seeds == 0][0]}


def test_order_of_faces_does_not_change_the_people(faces):
    cache, _ = faces
    rule = sort_faces.identity_rule(cache)
    perm = np.random.default_rng(0).permutation(len(cache.face_emb))
    base = sort_faces.identities(cache.face_emb, cache.face_file, rule)
    shuffled = sort_faces.identities(cache.face_emb[perm], cache.face_file[perm], rule)
    back = np.empty_like(shuffled)
    back[perm] = shuffled
    assert _partition(back) == _partition(base)
    assert np.array_equal(sort_faces.identities(cache.face_emb, cache.face_file, rule), base)


def test_labels_to_groups_matches_the_obvious_loop():
    labels = np.random.default_rng(1).integers(0, 50, 5000)
    groups = sort_faces.labels_to_groups(labels)
    assert [g.tolist() for g in groups] == [np.flatnonzero(labels == c).tolist()
                                            for c in np.unique(labels)]
    assert sort_faces.labels_to_groups([]) == []


def _tiny_cache(emb, files):
    """A Cache over given unit embeddings, one photo per distinct files entry."""
    n_files = int(max(files)) + 1
    cols = {"face_emb": np.asarray(emb, np.float32), "face_file": np.asarray(files, np.int64),
            "face_bbox": np.tile(np.float32([0, 0, 100, 100]), (len(emb), 1)),
            "file_path": np.array([f"/p/{f}.jpg" for f in range(n_files)]),
            "file_sha256": np.array([f"{f:064x}" for f in range(n_files)]),
            "file_status": np.full(n_files, "ok")}
    cache = sort_faces.Cache("/nonexistent/tiny.npz", {"pack": {"name": "default"}}, cols)
    return cache


def _near(direction, n, spread, rng):
    x = direction + spread * rng.standard_normal((n, len(direction))) / np.sqrt(len(direction))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_fold_in_grows_old_people_and_keeps_the_rest_new():
    """Old people gain their new faces and never merge; a new person forms apart; a
    stranger stays alone; a rejected face is ignored."""
    rng = np.random.default_rng(0)
    e = np.eye(64)
    a, b, c = _near(e[0], 6, 0.5, rng), _near(e[1], 6, 0.5, rng), _near(e[2], 5, 0.5, rng)
    stranger = e[3]
    new_a = _near(e[0], 3, 0.5, rng)
    emb = np.vstack([a, b, new_a, c, stranger[None], new_a[:1]])
    cache = _tiny_cache(emb, np.arange(len(emb)))
    old = [list(range(0, 6)), list(range(6, 12))]
    new = np.arange(12, len(emb))
    rule = sort_faces.identity_rule(cache)
    joined, fresh = sort_faces.fold_in(cache, old, new, rule)
    assert joined == {0: [12, 13, 14, 21]}
    assert sorted(map(sorted, fresh)) == [[15, 16, 17, 18, 19], [20]]
    corr = sort_faces.Corrections(np.full(len(emb), -1), np.zeros(0, np.int64), [],
                                  np.zeros((0, 2), np.int64), np.isin(np.arange(len(emb)), [21]))
    joined, _ = sort_faces.fold_in(cache, old, new, rule, corr=corr)
    assert joined == {0: [12, 13, 14]}


def _faces(parts, n, basis, fresh):
    """n unit faces: sum of weight * basis row for (weight, row) in parts, the rest of the
    length on a direction of their own (so every similarity is exactly what parts say)."""
    head = sum(w * basis[r] for w, r in parts)
    rest = np.sqrt(1 - sum(w * w for w, _ in parts))
    return np.stack([head + rest * basis[next(fresh)] for _ in range(n)])


def test_a_person_two_far_apart_groups_would_join_takes_in_no_one():
    """Stage 3 in a crowd (issue 24): two 2-face groups that would each join a 6-face
    person (0.70 from it, no other person near) but are 0.85 apart, too far to join each
    other: it takes in neither, nor a lone face at 0.70. Two groups 0.70 apart (one
    person's two looks) both join."""
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((64, 64)))[0].T
    fresh = iter(range(3, 64))
    person = _faces([(0.775, 0)], 6, basis, fresh)                  # 0.60 within
    group = _faces([(0.387, 0), (0.59, 1)], 2, basis, fresh)        # 0.30 to the person
    far = _faces([(0.387, 0), (0.59, 2)], 2, basis, fresh)          # 0.15 to group
    near = _faces([(0.387, 0), (0.254, 1), (0.533, 2)], 2, basis, fresh)   # 0.30 to group
    lone = _faces([(0.387, 0)], 1, basis, fresh)
    rule = sort_faces.IdentityRule(0.60, 0.45, 0.76, 0.12)

    def people(*parts, seeded=False):
        emb = np.vstack(parts).astype(np.float32)
        seeds = np.where(np.arange(len(emb)) < 6, 0, -1) if seeded else None
        return _partition(sort_faces.identities(emb, np.full(len(emb), -1), rule,
                                                seeds=seeds))
    crowd = [(0, 1, 2, 3, 4, 5), (6, 7), (8, 9), (10,)]
    assert people(person, group, far, lone) == crowd
    assert people(person, group, far, lone, seeded=True) == crowd   # an earlier person too
    assert people(person, group, near) == [tuple(range(10))]
    assert people(person, group) == [tuple(range(8))]       # one group alone still joins
