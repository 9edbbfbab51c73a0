"""`otprune fitprune-calibrate`: placeholder until its issue lands."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("fitprune-calibrate", help="FitPrune recipe calibration (issue 5)")
    parser.set_defaults(run=run)


def run(args) -> int:
    raise ValueError("'otprune fitprune-calibrate' is not implemented yet")
