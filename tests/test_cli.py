import subprocess
import sys

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
