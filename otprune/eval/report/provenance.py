"""The table's footer: which lmms-eval version wrote the records, and which judge scored MMBench."""

from __future__ import annotations

from collections.abc import Sequence

from otprune.eval.evidence import RunEvidence
from otprune.eval.records import installed_version

# MMBench's GPT judge when MODEL_VERSION is not set (lmms-eval 0.7's mmbench en_utils default); the
# paper's lmms-eval judged with gpt-3.5-turbo-0613.
DEFAULT_MMBENCH_JUDGE = "gpt-4o-2024-11-20"


def provenance(runs: Sequence[RunEvidence], tasks: Sequence[str]) -> list[str]:
    """Footer lines: the lmms-eval version(s) the records were written under, and MMBench's judge."""
    records = [record for run in runs for record in run.records]
    versions = sorted({str(r["lmms_eval_version"]) for r in records if r.get("lmms_eval_version")})
    if versions:
        lines = [f"lmms-eval: {', '.join(versions)} (from the records)."]
    else:
        lines = [f"lmms-eval: {installed_version('lmms-eval') or 'unknown'} (installed when this report was made; "
                 "the records do not say)."]
    if any(task.startswith("mmbench") for task in tasks):
        judges = sorted({r.get("mmbench_judge") or f"{DEFAULT_MMBENCH_JUDGE} (lmms-eval's default)" for r in records})
        static = [task for task in tasks if task.endswith("_static")]
        judge = ", ".join(judges) or f"{DEFAULT_MMBENCH_JUDGE} (lmms-eval's default)"
        lines.append(
            f"MMBench judge: {judge} (set MODEL_VERSION to change; the paper's lmms-eval used gpt-3.5-turbo-0613)"
            + (f"; {', '.join(static)}: rule-based answer matching, no judge." if static else ".")
        )
    return lines
