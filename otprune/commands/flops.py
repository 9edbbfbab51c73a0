"""`otprune flops`: placeholder until its issue lands."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("flops", help="FLOPs calculator (issue 4)")
    parser.set_defaults(run=run)


def run(args) -> int:
    raise ValueError("'otprune flops' is not implemented yet")
