"""The vLLM plugin and the 2025 baselines: what it cannot run is refused by name at engine start."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

from otprune import serve  # noqa: E402


@pytest.mark.parametrize("method, why", [("PRUMERGE", "merges tokens inside the vision tower"),
                                         ("CDPRUNER", "set CDPRUNER_CLIP"),  # with it: test_serve_cdpruner.py
                                         ("DART", "before the LLM only")])
def test_baselines_the_plugin_cannot_run_are_refused(method, why):
    with pytest.raises(ValueError, match=why):
        serve.engine_config({"BASELINE": method, "SUBSET_RATIO": "0.25"})


def test_visionzip_runs_in_the_plugin():  # merged inside the CLIP tower: tests/serve/test_serve_visionzip.py
    assert serve.engine_config({"BASELINE": "VISIONZIP", "SUBSET_RATIO": "0.25"}).method == "visionzip"
