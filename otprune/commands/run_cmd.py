"""`otprune run`: models x pruning settings x tasks through lmms-eval, verified, then the report
(`otprune.eval.runner`; `run_OTPrune.sh` passes its arguments here)."""

from __future__ import annotations


def register(subparsers) -> None:
    import argparse

    from otprune.eval.runner import EPILOG, add_arguments

    parser = subparsers.add_parser(
        "run",
        help="Evaluate models x pruning settings x tasks with lmms-eval (verified runs), then report",
        description="Run the OTPrune paper benchmark (or any model / setting / task) through lmms-eval. Every run "
        "is identified by its RunSpec and proven by the records its own lmms-eval process writes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from otprune.eval.runner import main

    return main(args)
