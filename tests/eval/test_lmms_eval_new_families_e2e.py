"""lmms-eval's OWN model names for the newer families, `qwen3_vl`, `qwen3_5`, `gemma3`, `internvl_hf`,
prune with the switches exactly as `llava_hf` does (test_lmms_eval_plain_names_e2e.py), end to end through
lmms-eval's CLI on tiny checkpoints (`otprune tiny-hf`), task `otprune_smoke_gen`:

- with the switches: pruned, records beside lmms-eval's results (method, K tokens per image);
- without: the same outputs as lmms-eval's own, unwrapped class, and no records file.

One name per family, in the kind lmms-eval has (qwen3_vl chat, qwen3_5 simple with --force_simple,
gemma3 simple, internvl_hf chat; both kinds of a name share the wiring, `test_lmms_plugin.py`). All
runs in ONE process (`lmms_cli_runs.py`): lmms-eval's import and task scan are paid once.
"""

import json
import sys
from pathlib import Path

import pytest
from lmms_cli_runs import assert_ran, child_env, side_by_side

from otprune.hf import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LIMIT = 2
TASK = "otprune_smoke_gen"
QWEN_PIXELS = ",min_pixels=4096,max_pixels=36864"  # 4 to 36 tokens of 32 x 32 px

# otprune.hf family -> (extra model_args, --force_simple?, switches, kept ratio, method)
CASES = {
    "qwen3_vl": (QWEN_PIXELS, False, {"BASELINE": "OURS", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.25"}, 0.25, "otprune"),
    "qwen3_5": (QWEN_PIXELS, True, {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.5"}, 0.5, "divprune"),
    "gemma3": ("", True, {"BASELINE": "OURS", "SUBSET_RATIO": "0.25"}, 0.25, "otprune"),
    "internvl_hf": (",max_patches=2", False, {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.25"}, 0.25, "divprune"),
}
FAMILY_OF = {"internvl_hf": "internvl"}
RUNS = ("pruned", "plain", "reference")


def _records(folder: Path) -> list[Path]:
    return sorted(folder.rglob("otprune_records_*.jsonl"))


def _samples(folder: Path) -> dict[int, dict]:
    (path,) = folder.rglob(f"*_samples_{TASK}.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["doc_id"]: {key: row[key] for key in ("input", "filtered_resps")} for row in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lmms_eval import models

    from otprune.eval.lmms_plugin import builtin_class

    base_dir = tmp_path_factory.mktemp("new_names")
    env = child_env(base_dir, ROOT)
    plan, folders, references = [], {}, {}
    for case, (extra, simple, switches, _, _) in CASES.items():
        family = FAMILY_OF.get(case, case)
        name = FAMILIES[family].lmms_model
        own = builtin_class(name, simple)
        references[f"reference_{name}"] = [f"{own.__module__}.{own.__qualname__}", None] if own.is_simple else \
            [None, f"{own.__module__}.{own.__qualname__}"]
        assert name in models.AVAILABLE_SIMPLE_MODELS or name in models.AVAILABLE_CHAT_TEMPLATE_MODELS
        checkpoint = FAMILIES[family].load_tiny_writer()(base_dir / f"tiny-{family}")
        for run in RUNS:
            out = base_dir / case / run
            argv = ["--model", name if run != "reference" else f"reference_{name}",
                    "--model_args", f"pretrained={checkpoint},device_map=cpu{extra}",
                    "--device", "cpu", "--tasks", TASK, "--include_path", str(ROOT / "lmms_eval" / "tasks"),
                    "--batch_size", "1", "--limit", str(LIMIT), "--output_path", str(out), "--log_samples",
                    "--gen_kwargs", "max_new_tokens=2", *(["--force_simple"] if simple else [])]
            plan.append({"env": switches if run == "pruned" else {}, "argv": argv})
            folders[(case, run)] = out
    spec = base_dir / "spec.json"
    spec.write_text(json.dumps({"references": references, "runs": plan}))
    done = side_by_side({"all": ([sys.executable, str(HERE / "lmms_cli_runs.py"), str(spec)], env, base_dir)}, timeout=1200)
    return folders, *done["all"]


def test_every_run_ran(runs):
    folders, code, log = runs
    assert_ran(code, log)
    for folder in folders.values():
        assert len(_samples(folder)) == LIMIT, folder


@pytest.mark.parametrize("case", list(CASES))
def test_switches_prune_the_plain_name(runs, case):
    folders = runs[0]
    _, _, _, ratio, method = CASES[case]
    paths = _records(folders[(case, "pruned")])
    lines = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if line.get("otprune_record")]  # the run's spec and end lines aside
    assert len(lines) == LIMIT
    for record in lines:
        assert record["method"] == method and record["layer"] == 0 and record["ratio"] == ratio
        expected = [max(1, round(ratio * n)) for n in record["image_tokens_before"]]
        assert record["image_tokens_after"] == expected and sum(expected) < record["visual_tokens_before"]
        assert record["seq_len_after"] == record["text_tokens"] + sum(expected)


@pytest.mark.parametrize("case", list(CASES))
def test_without_switches_the_plain_name_is_lmms_evals_own(runs, case):
    folders = runs[0]
    plain, reference = folders[(case, "plain")], folders[(case, "reference")]
    assert _records(plain) == [] and _records(reference) == []
    assert _samples(plain) == _samples(reference)
