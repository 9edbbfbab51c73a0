"""The `otprune` command line. Each subcommand lives in `otprune/commands/<name>.py` and
provides `register(subparsers)`; heavy imports happen inside the command, so `--help` is fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module) in the order `otprune --help` lists them.
COMMANDS = [
    ("bench", "otprune.commands.bench"),
    ("tiny-llava", "otprune.commands.tiny_llava"),
    ("flops", "otprune.commands.flops"),
    ("report", "otprune.commands.report"),
    ("fitprune-calibrate", "otprune.commands.fitprune_calibrate"),
    ("synth", "otprune.commands.synth"),
    ("show", "otprune.commands.show"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otprune",
        description="OTPrune: distribution-aligned visual token pruning for multimodal LLMs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for _, module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"otprune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
