#!/usr/bin/env python3
"""Face sets from folders you already sorted by person.

Each --trusted folder is one person (its name is the label). Their faces in the cache
(byte-identical aliases included) give the person's centroid by two-pass outlier rejection,
so bystanders in group photos drop out; faces under --mixed folders are routed to every
person whose centroid is close enough. Each person is exported like `export-swap` into
SWAP_OUT, named after the folder, with a <label>.txt marker. Facesets already in SWAP_OUT
are never touched: re-running adds only new trusted folders.

  python sort_faces.py embed ~/Pictures work/cache/photos.npz
  python sort_faces.py enrich work/cache/photos.npz
  python work/build_folders.py --cache work/cache/photos.npz --out facesets_swap_ready \\
      --trusted ~/Pictures/people/Anna ~/Pictures/people/Ben --mixed ~/Pictures/2023
"""
import argparse
import datetime
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sort_faces as sf  # noqa: E402

def label_of(folder):
    """A faceset name from a folder name, by the rule `name` applies to a person's name
    (sort_faces.check_person_name: spaces kept, NFC)."""
    return sf.check_person_name(os.path.basename(os.path.normpath(folder)),
                                f"--trusted folder {folder}: its name")


def identity(cache, faces):
    """The faces of a trusted folder that are its person: those within the pack's outlier
    distance of the centroid, then within its export distance of the centroid recomputed
    (a group photo's bystanders fall out)."""
    return sf.centroid_gate(cache.face_emb, faces, (sf.pack_threshold(cache, "outlier"),
                                                    sf.pack_threshold(cache, "export_outlier")))


def route(cache, mixed, people, rule, existing=None, belongs=None):
    """Mixed faces -> the person each joins by the identity rule (README: How faces become
    people: the nearest person, within rule.join and rule.margin nearer than the next);
    one photo's faces never go to the same person twice (the nearest wins), and a face
    within `belongs` of a faceset already exported (existing: {name: centroid}) stays out.
    Returns (routed {person: faces}, held {person: {existing faceset: faces it kept}})."""
    held = {}
    if not people or not len(mixed):
        return {}, held
    names = list(people)
    mixed = np.asarray(mixed, np.int64)
    means = np.stack([cache.face_emb[people[n]].mean(axis=0) for n in names])
    pick, sims = sf.nearest_person(means, cache.face_emb[mixed], rule)
    if existing:
        d = 1.0 - cache.face_emb[mixed] @ np.stack(list(existing.values())).T
        kept = d.min(axis=1) <= belongs
        for k in np.flatnonzero(kept & (pick >= 0)):
            by = held.setdefault(names[pick[k]], {})
            owner = list(existing)[int(d[k].argmin())]
            by[owner] = by.get(owner, 0) + 1
        pick[kept] = -1
    routed, taken = {}, set()
    for k in np.argsort(-sims, kind="stable"):
        g = int(pick[k])
        key = (int(cache.face_file[mixed[k]]), g)
        if g < 0 or key in taken or int(mixed[k]) in people[names[g]]:
            continue
        taken.add(key)
        routed.setdefault(names[g], []).append(int(mixed[k]))
    return routed, held


def run(args):
    cache = sf.load_cache(args.cache)
    swap = sf.SwapOut(args.out, cache, clean=args.clean, dry_run=args.dry_run)
    try:
        return build(cache, swap, args)
    finally:
        swap.dir.close()


def build(cache, swap, args):
    done = {e.get("key") or e.get("trusted"): e["name"] for e in swap.facesets
            if e.get("source") == "build_folders" and e["name"] not in swap.old}
    people, folders, skipped = {}, {}, []
    for folder in args.trusted:
        if not os.path.isdir(folder):
            raise sf.SortFacesError(f"--trusted folder not found: {folder}")
        if os.path.abspath(folder) in done:       # named when it was first built
            skipped.append(done[os.path.abspath(folder)])
            continue
        label = label_of(folder)
        if label.casefold() in {p.casefold() for p in people}:
            raise sf.SortFacesError(f"--trusted folders {folders[label]} and {folder} would "
                                    f"both be {label!r}: one folder per person")
        faces = identity(cache, sf.faces_under(cache, [folder]))
        if not faces:
            sf.CONSOLE.warn(folder, "no faces of this folder's person in the cache "
                                    "(run `embed` on it first)")
            continue
        people[label], folders[label] = faces, os.path.abspath(folder)
    mixed = sf.faces_under(cache, args.mixed) if args.mixed else np.zeros(0, np.int64)
    rule = sf.identity_rule(cache, join=args.join_threshold, margin=args.join_margin)
    existing = dict(zip([e["name"] for e in swap.facesets if e.get("embedding")],
                        swap.centroids()))
    belongs = sf.pack_threshold(cache, "outlier")
    routed, held = route(cache, mixed, people, rule, existing, belongs)
    for label, faces in people.items():
        kept = held.get(label, {})
        why = (" (" + ", ".join(f"{n} of its faces there stayed with {name}, already in OUT"
                                for name, n in sorted(kept.items())) + ")") if kept else ""
        sf.CONSOLE.info(f"{label}: {len(faces)} faces from its folder, "
                        f"{len(routed.get(label, []))} routed from mixed folders{why}")
        twin = min(existing.items(), default=None, key=lambda kv: float(
            1.0 - sf.centroid(cache.face_emb[faces]) @ kv[1]))
        if twin and 1.0 - float(sf.centroid(cache.face_emb[faces]) @ twin[1]) <= belongs:
            sf.CONSOLE.warn(folders[label], f"this folder's person looks like {twin[0]}, "
                                            f"already in {swap.path}: {label} will be a "
                                            f"second faceset of them")
    if skipped:
        sf.CONSOLE.info(f"already in {swap.path}, left as they are: {', '.join(skipped)}")
    if args.dry_run or not people:
        sf.log_result(f"build_folders: {len(people)} new facesets"
                      + (" [dry run: nothing written]" if args.dry_run else ""))
        return 0
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    opts = sf.ExportOptions.from_args(args)
    written = []
    for label, faces in people.items():
        extra = {"trusted": folders[label], "at": stamp,
                 "mixed": [os.path.abspath(m) for m in args.mixed],
                 "routed": len(routed.get(label, []))}
        entry = sf.export_marked(cache, swap, label, faces + routed.get(label, []), opts,
                                 source="build_folders", key=folders[label], extra=extra,
                                 note=f"built by work/build_folders.py at {stamp}\n"
                                      f"trusted folder: {folders[label]}\n"
                                      f"routed from mixed folders: {extra['routed']}")
        if entry:
            written.append(entry["name"])
    swap.finish()
    sf.log_result(f"build_folders: {len(written)} new facesets ({', '.join(written)}); "
                  f"wrote {swap.path}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=sf.HelpFormatter)
    sf.add_workflow_args(p)
    p.add_argument("--trusted", nargs="+", required=True, metavar="DIR",
                   help="folders that each hold one person")
    p.add_argument("--mixed", nargs="*", default=[], metavar="DIR",
                   help="folders of other photos to route to those people")
    g = p.add_argument_group("routing (README: How faces become people, stage 3)")
    g.add_argument("--join-threshold", type=float, default=None, metavar="DIST",
                   help="a mixed face joins the nearest person within this average distance"
                        "...; unset: " + sf.pack_defaults_help("join"))
    g.add_argument("--join-margin", type=float, default=None, metavar="DIST",
                   help="...if that person is this much nearer than the next; unset: "
                        + sf.pack_defaults_help("margin"))
    sf.add_model_dir_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print what would happen, write nothing")
    sf.add_swap_args(p)
    sf.add_common_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return sf.run_step("build_folders", run, args)


if __name__ == "__main__":
    raise SystemExit(main())
