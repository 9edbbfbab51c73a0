"""`otprune show`: placeholder until its issue lands."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("show", help="Picture of the kept patches (issue 6)")
    parser.set_defaults(run=run)


def run(args) -> int:
    raise ValueError("'otprune show' is not implemented yet")
