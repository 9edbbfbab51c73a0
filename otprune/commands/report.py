"""`otprune report`: placeholder until its issue lands."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="Results table from lmms-eval logs (issue 4)")
    parser.set_defaults(run=run)


def run(args) -> int:
    raise ValueError("'otprune report' is not implemented yet")
