"""The runs behind the paper's analyses (issue #16 point 3): `run_OTPrune.sh --study fig2|fig3|fig5|sota`.

Each study names the models, pruning methods, kept ratios and (Fig. 5) OTPrune gammas whose runs
`otprune report` turns into that figure (`otprune.eval.report.figures`); `none` (the unpruned
model) is always included, for the relative performance. The paper gives the models, methods and
benchmarks; where it does not give a value, the choice here is ours (marked "ours"):

| study | paper | models | methods | kept ratios | gammas |
|---|---|---|---|---|---|
| fig2 | Fig. 2 (Sec. 3, hypothesis) | LLaVA-1.5-7B | First-K, Last-K, Uniform, Random, DivPrune | 0.098 (ours: Table 1's) | - |
| fig3 | Fig. 3 / 4 (Sec. 5.3) | LLaVA-1.5-13B | OTPrune, DivPrune, DPP, Random | 0.05, 0.098, 0.2, 0.3, 0.4, 0.5 (ours) | - |
| fig5 | Fig. 5 (Sec. 5.3) | LLaVA-1.5-7B, 1.5-13B, 1.6-7B | OTPrune | 0.098 (ours: Table 1's) | 0.005, 0.01, 0.02, 0.05, 0.1 (ours; the text names 0.005 and 0.01) |
| sota | none (after the paper: its baselines of 2025) | LLaVA-1.5-7B | OTPrune, DivPrune, CDPruner, VisionZip, DART | 64 / 128 / 192 of 576 tokens (LLaVA-1.5's usual budgets) | - |

All on the paper's 11 benchmarks (`otprune_paper`), pruning before the LLM (layer 0; DART at its own
layer 2, inside the LLM). `--smoke`
runs the same methods on the tiny random checkpoint and the local `otprune_smoke` task, with
fewer ratios / gammas, so that CI covers every artefact in a few minutes (`sota` without CDPruner,
whose tiny checkpoint's tower has no CLIP text side, and DART, whose layer 2 the tiny 2-layer LLM
lacks: both are covered by tests/llava/test_llava_cdpruner.py and test_llava_dart.py).

`python -m otprune.eval.studies NAME [--smoke]` prints the plan as shell assignments (MODELS,
TASKS, METHODS, RATIOS, LAYERS, GAMMAS), which run_OTPrune.sh evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

PAPER_TASKS = "otprune_paper"


@dataclasses.dataclass(frozen=True)
class Study:
    """One figure's runs: models, methods (run_OTPrune.sh --methods names), kept ratios, OTPrune gammas."""

    name: str
    figure: str
    models: tuple[str, ...]
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    gammas: tuple[float, ...] = ()
    smoke_ratios: tuple[float, ...] = (0.25,)
    smoke_gammas: tuple[float, ...] = ()
    smoke_methods: tuple[str, ...] | None = None  # default: `methods`

    def assignments(self, smoke: bool = False) -> dict[str, str]:
        """The run script's variables for this study (the smoke variant on the tiny checkpoint)."""
        ratios = self.smoke_ratios if smoke else self.ratios
        gammas = self.smoke_gammas if smoke else self.gammas
        methods = self.smoke_methods if smoke and self.smoke_methods is not None else self.methods
        out = {
            "METHODS": ",".join(("none", *methods)),
            "RATIOS": ",".join(f"{r:g}" for r in ratios),
            "LAYERS": "0",
            "GAMMAS": ",".join(f"{g:g}" for g in gammas),
        }
        if not smoke:
            out["STUDY_MODELS"] = ",".join(self.models)
            out["STUDY_TASKS"] = PAPER_TASKS
        return out


STUDIES = {
    "fig2": Study("fig2", "Fig. 2: Spearman of OT-distance rank vs task-score rank",
                  ("liuhaotian/llava-v1.5-7b",), ("FIRSTK", "LASTK", "UNIFORM", "RANDOM", "DIVPRUNE"), (0.098,),
                  smoke_ratios=(0.25,)),
    "fig3": Study("fig3", "Fig. 3 / 4: relative performance and OT distance over kept ratios",
                  ("liuhaotian/llava-v1.5-13b",), ("OURS", "DIVPRUNE", "DPP", "RANDOM"),
                  (0.05, 0.098, 0.2, 0.3, 0.4, 0.5), smoke_ratios=(0.25, 0.5)),
    "fig5": Study("fig5", "Fig. 5: sensitivity to gamma",
                  ("liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-13b", "liuhaotian/llava-v1.6-vicuna-7b"),
                  ("OURS",), (0.098,), gammas=(0.005, 0.01, 0.02, 0.05, 0.1),
                  smoke_ratios=(0.25,), smoke_gammas=(0.005, 0.01, 0.1)),
    "sota": Study("sota", "The baselines of 2025 beside OTPrune at LLaVA-1.5's budgets (64 / 128 / 192 tokens)",
                  ("liuhaotian/llava-v1.5-7b",), ("OURS", "DIVPRUNE", "CDPRUNER", "VISIONZIP", "DART"),
                  (64 / 576, 128 / 576, 192 / 576), smoke_ratios=(0.25,),
                  smoke_methods=("OURS", "DIVPRUNE", "VISIONZIP")),
}


def get_study(name: str) -> Study:
    key = name.strip().lower()
    if key not in STUDIES:
        raise ValueError(f"--study {name!r}: unknown study; known: {', '.join(STUDIES)}")
    return STUDIES[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m otprune.eval.studies",
                                     description="Print a study's plan as shell assignments (run_OTPrune.sh --study).")
    parser.add_argument("study", help=f"one of {', '.join(STUDIES)}")
    parser.add_argument("--smoke", action="store_true", help="the tiny-checkpoint variant")
    args = parser.parse_args(argv)
    try:
        study = get_study(args.study)
    except ValueError as err:
        print(f"run_OTPrune.sh: error: {err}", file=sys.stderr)
        return 2
    for key, value in study.assignments(args.smoke).items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
