"""The command line: help texts, return codes, one-line errors, the run log."""
import argparse
import re

import pytest

import sort_faces
from conftest import requires_data


def subcommands():
    parser = sort_faces.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def help_text(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        sort_faces.main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def option_blocks(text):
    """{first option string: its help text on one line} from argparse's --help output."""
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def parser_options(parser):
    """The first option string of every documented option (not -h/--version)."""
    return {a.option_strings[0] for a in parser._actions if a.option_strings
            and a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}


STEPS = ["embed", "cluster", "refine", "dedup", "extend", "enrich", "export-swap"]


def test_top_level_help_lists_every_step(capsys):
    out = help_text(capsys, ["--help"])
    assert out.startswith("usage: sort_faces.py")
    assert "examples:" in out
    for step in STEPS:                       # the README's table, not the parser itself
        assert re.search(rf"^\s+{step}\s", out, re.M), f"{step} missing from --help"


@pytest.mark.parametrize("step", subcommands())
def test_every_option_shows_its_default(capsys, step):
    out = help_text(capsys, [step, "--help"])
    assert out.startswith(f"usage: sort_faces.py {step}")
    sub = next(a for a in sort_faces.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices[step]
    want = parser_options(sub)
    blocks = option_blocks(out)
    assert want and want <= set(blocks), f"options missing from {step} --help"
    defaults = {a.option_strings[0]: a.default for a in sub._actions if a.option_strings}
    for opt in want:
        if defaults[opt] is None:     # nothing to show; the help text says what unset means
            assert "(default: None)" not in blocks[opt], blocks[opt]
        else:
            squeeze = lambda t: "".join(t.split())         # help wraps long paths at '-'
            assert squeeze(f"(default: {defaults[opt]})") in squeeze(blocks[opt]), \
                f"{step} {opt}: default not shown: {blocks[opt]}"


def test_version(capsys):
    assert sort_faces.__version__ in help_text(capsys, ["--version"])


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        sort_faces.main(["embed", "src", "c.npz", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


@requires_data
def test_main_returns_ints_and_logs_the_run(copy_photos, tmp_path, capsys):
    copy_photos(tmp_path / "src", 2)
    logs = tmp_path / "logs"
    capsys.readouterr()
    rc = sort_faces.main(["embed", str(tmp_path / "src"), str(tmp_path / "c.npz"), "-q",
                          "--log-dir", str(logs)])
    out, err = capsys.readouterr()
    assert rc == 0 and type(rc) is int
    assert err == ""                                     # -q: nothing on stderr
    assert out.startswith("embed: 2 files seen, 2 new") and out.count("\n") == 1
    (log,) = logs.iterdir()
    assert "embed" in log.name and out.strip() in log.read_text()
    rc = sort_faces.main(["cluster", str(tmp_path / "missing.npz"), str(tmp_path / "out"),
                          "-q", "--log-dir", str(logs)])
    assert rc == 1 and type(rc) is int


@requires_data
def test_missing_model_dir_is_one_error_line(copy_photos, tmp_path, capsys):
    copy_photos(tmp_path / "src", 1)
    capsys.readouterr()
    rc = sort_faces.main(["embed", str(tmp_path / "src"), str(tmp_path / "c.npz"), "-q",
                          "--model-dir", "/nonexistent", "--log-dir", str(tmp_path / "logs")])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "/nonexistent" in lines[0] and ".onnx" in lines[0] and "--model-dir" in lines[0]
    assert out == ""
    assert not (tmp_path / "c.npz").exists()
