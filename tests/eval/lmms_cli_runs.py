"""Test helper: several lmms-eval command lines in ONE process, each exactly as `python -m lmms_eval ARGV`
runs it (`lmms_eval.__main__.cli_evaluate()` on `sys.argv`). Importing lmms-eval is most of a tiny run's
time on a small CPU, so a test pays it once per process instead of once per run.

    python lmms_cli_runs.py SPEC.json

`side_by_side(jobs)` starts several such processes (or any commands) at once and collects their logs.

SPEC = {"references": {NAME: [simple class path, chat class path]},   # optional
        "runs": [{"env": {VAR: VALUE}, "argv": [ARG, ...]}, ...]}

`references` registers lmms-eval's own classes under extra model names (`--model NAME` then runs them
unwrapped, whatever the entry points registered over lmms-eval's names). Before each run the pruning
switches and OTPRUNE_RECORDS are removed from the environment and the run's `env` is set, and our records
writer is forgotten (it is made once per process, from the command line: one process per CLI call in
real use). A line "=== run I" on stdout starts each run's part of the log. The task index (lmms-eval's
scan of its task YAMLs, ~15 s) is made once per process: `TaskManager.initialize_tasks` is memoized by
its arguments; every run still gets its own TaskManager (with its model name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CLEARED = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER",
           "FITPRUNE_RECIPE", "OTPRUNE_RECORDS", "CDPRUNER_CLIP", "CDPRUNER_THETA")


def side_by_side(jobs: dict, timeout: float) -> dict:
    """Start every job (key -> (argv, env, cwd)) at once, stdout and stderr merged, and wait for all.
    Returns key -> (exit status, log)."""
    procs = {key: subprocess.Popen(argv, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for key, (argv, env, cwd) in jobs.items()}
    done = {}
    for key, proc in procs.items():
        log, _ = proc.communicate(timeout=timeout)
        done[key] = (proc.returncode, log)
    return done


def child_env(base_dir, root) -> dict:
    """The environment of an lmms-eval process of a test: this one's without the switches and records
    settings, offline, one thread, datasets cached under `base_dir`, the checkout `root` (and its LLaVA)
    first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_RECORDS", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(base_dir / "hf"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), str(root / "LLaVA"), os.environ.get("PYTHONPATH")])))
    return env


def assert_ran(code: int, log: str) -> None:
    """An lmms-eval process ended well: exit status 0 and no traceback (lmms-eval catches a model's
    exception, prints it and still exits 0)."""
    assert code == 0, log[-4000:]
    assert "Traceback" not in log, log[-6000:]


def main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
    from lmms_eval.tasks import TaskManager

    from otprune.eval import records

    scan = TaskManager.initialize_tasks
    scanned: dict[tuple, dict] = {}

    def memoized(self, include_path=None, include_defaults=True):
        key = (json.dumps(include_path), include_defaults)
        if key not in scanned:
            scanned[key] = scan(self, include_path=include_path, include_defaults=include_defaults)
        return dict(scanned[key])

    TaskManager.initialize_tasks = memoized

    for name, (simple, chat) in spec.get("references", {}).items():
        MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=name, simple_class_path=simple, chat_class_path=chat))
    for index, run in enumerate(spec["runs"]):
        for name in CLEARED:
            os.environ.pop(name, None)
        os.environ.update(run.get("env", {}))
        sys.argv = ["lmms_eval", *run["argv"]]
        records.reset()
        print(f"=== run {index}", flush=True)
        cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
