"""`otprune tiny-llava`: placeholder until its issue lands."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("tiny-llava", help="Write a tiny random-weight LLaVA checkpoint (issue 3)")
    parser.set_defaults(run=run)


def run(args) -> int:
    raise ValueError("'otprune tiny-llava' is not implemented yet")
