"""`otprune bench selection`: placeholder, filled in by the core issue."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="Benchmarks")
    parser.add_argument("what", choices=["selection"])
    parser.set_defaults(run=run)


def run(args) -> int:
    raise ValueError("not implemented yet")
