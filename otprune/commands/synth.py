"""`otprune synth`: placeholder until its issue lands."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("synth", help="The paper's synthetic study (issue 6)")
    parser.set_defaults(run=run)


def run(args) -> int:
    raise ValueError("'otprune synth' is not implemented yet")
