"""`otprune synth`: the paper's synthetic study (Table 2) -- win rate and optimality ratio of
OTPrune, DivPrune, DPP and random selection under the trace objective, beside the paper's numbers."""

from __future__ import annotations

import argparse
import os

DESCRIPTION = """\
Reproduce the OTPrune paper's synthetic study (Sec. 4, Table 2).

For every (n, d, k) setting and seed: draw n i.i.d. standard Gaussian points of d dims, let
each method keep k of them, and score subsets by the trace objective
Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2) (higher is better; per-dimension normalised, zero-mean
second moments as in the paper; --centred uses covariances). All C(n, k) subsets are scored
when there are at most --exhaustive-max of them, otherwise --samples uniformly random subsets.

win rate  = share of scored subsets whose objective is strictly below the method's (ties,
            within a relative 1e-9, do not count; in exhaustive mode the method's own subset
            is a tie, so the maximum is 1 - 1/C(n, k)).
opt. ratio = method's objective / best objective found (over the scored subsets and all
            methods' subsets).
Numbers are mean ± sample std over seeds, in percent.

Scoring runs in float32 on --workers threads (one BLAS thread each); every comparison that
float32 could get wrong is re-scored in float64, so the counts are exact.

Run time: the full default (10M samples, 3 seeds) takes about 2.3-2.7 hours on 2 CPU cores,
most of it in (1000, 256, 100) (about 33 min per seed: one 100 x 100 eigvalsh per subset);
--estimate measures the projection on your machine; --quick is a smoke run (< 1 min).
"""

QUICK = {"samples": 50_000, "seeds": 2, "exhaustive_max": 100_000}
DEFAULTS = {"samples": 10_000_000, "seeds": 3, "exhaustive_max": 50_000_000}


def _setting(text: str) -> tuple[int, int, int]:
    parts = text.replace("(", "").replace(")", "").split(",")
    try:
        n, d, k = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting {text!r}: expected N,D,K, e.g. 20,10,5") from None
    if min(n, d, k) < 1 or k >= n:
        raise argparse.ArgumentTypeError(f"setting {text!r}: need N, D, K >= 1 and K < N")
    return n, d, k


def _count(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer such as 10000000 or 1e7") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="The paper's synthetic study (Table 2): win rate / optimality ratio vs the paper",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--settings", nargs="+", type=_setting, metavar="N,D,K",
        help="settings to run (default: the paper's five: 20,10,5 30,20,10 100,50,30 100,80,50 1000,256,100)",
    )
    parser.add_argument("--samples", type=_count, help=f"random subsets per seed when not exhaustive (default {DEFAULTS['samples']:,}, as in the paper)")
    parser.add_argument("--exhaustive-max", type=_count, help=f"enumerate all C(n, k) subsets when there are at most this many (default {DEFAULTS['exhaustive_max']:,})")
    parser.add_argument("--seeds", type=_count, help=f"number of data sets (seeds) per setting (default {DEFAULTS['seeds']})")
    parser.add_argument("--seed", type=int, default=0, help="first seed; seeds are SEED .. SEED+SEEDS-1 (default 0)")
    parser.add_argument("--methods", default="otprune,divprune,dpp,random", help="comma-separated methods (default otprune,divprune,dpp,random)")
    parser.add_argument("--gamma", type=float, default=0.01, help="OTPrune's gamma (default 0.01)")
    parser.add_argument("--centred", action="store_true", help="score with covariances instead of the paper's zero-mean second moments")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="scoring precision (float32 with exact float64 re-checks; default)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="scoring threads (default: all CPUs)")
    parser.add_argument("--chunk", type=int, default=None, help="subsets per batched eigvalsh (default: about 2^19 matrix entries)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK['samples']:,} samples, {QUICK['seeds']} seeds, exhaustive up to {QUICK['exhaustive_max']:,} (explicit options win)")
    parser.add_argument("--estimate", action="store_true", help="only measure the scoring speed and print the projected run time")
    parser.add_argument("--json", metavar="FILE", help="write every number (per seed and summary) to FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run, needs=("ot", "tqdm"))


def _resolve(args) -> dict:
    base = QUICK if args.quick else DEFAULTS
    conf = {key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in DEFAULTS}
    if conf["samples"] < 1:
        raise ValueError(f"--samples={conf['samples']}: must be >= 1")
    if conf["seeds"] < 1:
        raise ValueError(f"--seeds={conf['seeds']}: must be >= 1")
    if args.workers < 1:
        raise ValueError(f"--workers={args.workers}: must be >= 1")
    if args.chunk is not None and args.chunk < 1:
        raise ValueError(f"--chunk={args.chunk}: must be >= 1")
    if not args.gamma > 0:
        raise ValueError(f"--gamma={args.gamma}: must be > 0")
    return conf


def _fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def run(args) -> int:
    import json
    import math
    import time

    import torch
    from tqdm import tqdm

    from otprune import METHODS
    from otprune.analysis import synthetic as S

    conf = _resolve(args)
    settings = args.settings or list(S.SETTINGS)
    methods = [METHODS.canonical(m) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--methods={args.methods!r}: name at least one method")
    dtype = getattr(torch, args.dtype)
    seeds = list(range(args.seed, args.seed + conf["seeds"]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one BLAS thread per worker: MKL's threaded small eigvalsh is slow
    try:
        if args.estimate:
            total = 0.0
            print(f"projected time of the configured run ({len(seeds)} seed(s), {args.workers} worker(s), {args.dtype}):")
            for n, d, k in settings:
                plan = S.plan_setting(n, k, d, conf["samples"], conf["exhaustive_max"], args.chunk)
                per = S.time_per_subset(n, d, k, dtype=dtype, workers=args.workers, chunk=args.chunk)
                seconds = per * plan.count * len(seeds)
                total += seconds
                print(
                    f"  ({n}, {d}, {k}): {plan.mode} {plan.count:,} subsets/seed, {per * 1e6:.1f} us/subset -> "
                    f"{_fmt_seconds(per * plan.count)} per seed, {_fmt_seconds(seconds)} in all"
                )
            print(f"  total: {_fmt_seconds(total)}")
            return 0

        print(
            f"otprune synth: {len(settings)} setting(s) x {len(seeds)} seed(s); methods {', '.join(methods)}; "
            f"MC samples {conf['samples']:,}, exhaustive up to {conf['exhaustive_max']:,}; "
            f"{'covariance' if args.centred else 'zero-mean second moment'}; {args.workers} worker(s)"
        )
        entries = []
        started = time.perf_counter()
        for n, d, k in settings:
            runs = []
            for seed in seeds:
                plan = S.plan_setting(n, k, d, conf["samples"], conf["exhaustive_max"], args.chunk)
                bar = tqdm(
                    total=plan.count, unit="subset", unit_scale=True, desc=f"({n},{d},{k}) seed {seed}",
                    disable=args.no_progress, leave=False, dynamic_ncols=True,
                )
                with bar:
                    result = S.run_setting(
                        n, d, k, seed, samples=conf["samples"], exhaustive_max=conf["exhaustive_max"],
                        methods=methods, gamma=args.gamma, centred=args.centred, dtype=dtype,
                        workers=args.workers, chunk=args.chunk, on_chunk=bar.update,
                    )
                runs.append(result)
                wins = ", ".join(f"{m} {100 * v['win_rate']:.2f}%" for m, v in result["methods"].items())
                print(
                    f"  ({n}, {d}, {k}) seed {seed}: {result['mode']} {result['subsets_scored']:,} subsets in "
                    f"{_fmt_seconds(result['seconds'])}; win {wins}"
                )
            entries.append({
                "n": n, "d": d, "k": k,
                "subset_space": math.comb(n, k),
                "runs": runs,
                "summary": S.summarise(runs),
                "paper": {m: {"win_rate": w, "optimality_ratio": o} for m, (w, o) in S.PAPER_TABLE2.get((n, d, k), {}).items()},
            })
    finally:
        torch.set_num_threads(threads)

    report = {
        "protocol": {
            "objective": "Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2), " + ("covariances" if args.centred else "zero-mean second moments") + " of per-dimension normalised features",
            "data": "n x d i.i.d. N(0, 1), torch CPU generator seeded with the seed",
            "win_rate": "share of scored subsets with a strictly lower objective; ties (relative 1e-9) not counted",
            "optimality_ratio": "method objective / best objective over the scored subsets and all methods' subsets",
            "samples": conf["samples"], "exhaustive_max": conf["exhaustive_max"], "seeds": seeds,
            "methods": methods, "gamma": args.gamma, "centred": args.centred, "dtype": args.dtype,
            "workers": args.workers, "seconds": time.perf_counter() - started,
        },
        "settings": entries,
    }
    table = S.format_table(report)
    print()
    print("Table 2 (percent; ours: mean ± std over seeds)")
    print(table)
    print("random expected opt. ratio (mean objective / best): " + ", ".join(
        f"({e['n']}, {e['d']}, {e['k']}) {e['summary']['_random_expected']['optimality_ratio']:.2f}" for e in entries
    ))
    print("exact W2 between all points and each method's subset (POT; mean over seeds; lower = closer):")
    print(S.format_w2(report))
    print(f"total time {_fmt_seconds(report['protocol']['seconds'])}")
    if args.json:
        report["table"] = table
        from otprune.eval import atomic

        atomic.write_text(args.json, json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0
