import subprocess
import sys

import pytest
import torch

from otprune.cli import COMMANDS, main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "otprune.cli", "--help"], capture_output=True, text=True, check=True)
    for name, _ in COMMANDS:
        assert name in out.stdout


def test_bench_selection_prints_the_table(capsys):
    assert main(["bench", "selection", "--sizes", "64,96", "--dim", "32", "--repeats", "1", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "OTPrune/floor" in out and "| 64 | 6 |" in out and "| 96 | 9 |" in out
    for method in ("otprune", "divprune", "dpp", "random", "uniform", "first_k", "last_k"):
        assert f"{method} ms" in out


def test_bench_bad_sizes(capsys):
    assert main(["bench", "selection", "--sizes", "a,b"]) == 2
    assert "--sizes='a,b'" in capsys.readouterr().err


def test_version_and_python_dash_m():
    from otprune import __version__

    for argv in ([sys.executable, "-m", "otprune", "--version"], [sys.executable, "-m", "otprune.cli", "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"otprune {__version__}"
    out = subprocess.run([sys.executable, "-m", "otprune", "--help"], capture_output=True, text=True, check=True)
    assert "synth" in out.stdout and "COMMAND --help" in out.stdout


def test_missing_optional_extra_is_a_clean_error(monkeypatch, capsys):
    # POT not installed: `synth` and `show` say which extra to install, no traceback.
    monkeypatch.setitem(sys.modules, "ot", None)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ot" else real_find_spec(name, *a))
    for command in (["synth", "--quick"], ["show", "x.png"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"otprune {command[0]}: error: this command needs the optional package 'POT'" in err
        assert "pip install 'otprune[analysis]'" in err and "Traceback" not in err


def test_missing_extra_raised_inside_a_command_is_a_clean_error(monkeypatch, capsys):
    def needs_pot(args):
        import ot  # noqa: F401  (None in sys.modules: ModuleNotFoundError)

    def buggy(args):
        import not_an_optional_package_xyz  # noqa: F401

    monkeypatch.setitem(sys.modules, "ot", None)
    monkeypatch.setattr("otprune.cli.build_parser", lambda: _one_command_parser(needs_pot))
    assert main(["x"]) == 2
    assert "pip install 'otprune[analysis]'" in capsys.readouterr().err
    monkeypatch.setattr("otprune.cli.build_parser", lambda: _one_command_parser(buggy))
    with pytest.raises(ModuleNotFoundError):  # not an optional extra: a real bug, not hidden
        main(["x"])


def _one_command_parser(run):
    import argparse

    parser = argparse.ArgumentParser(prog="otprune")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("x").set_defaults(run=run)
    return parser


def test_bench_selection_compile_times_eager_and_compiled(capsys, monkeypatch):
    import otprune.selection as selection

    monkeypatch.setattr(selection, "compiled_select",  # the eager backend: the table, not inductor's compile time
                        lambda sel, dev: torch.compile(sel.select, fullgraph=True, backend="eager", dynamic=False))
    argv = ["bench", "selection", "--sizes", "40", "--dim", "8", "--repeats", "1", "--batch", "2", "--methods", "otprune,dpp",
            "--compile"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compiled/eager" in out and "| 40 | otprune |" in out and "| 40 | dpp |" in out
