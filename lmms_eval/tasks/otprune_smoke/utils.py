"""Helpers of the `otprune_smoke` tasks (referenced from the YAML files by `!function utils.NAME`;
lmms-eval imports this file by its path). The data are local: `smoke.jsonl` and `images/`,
written by `scripts/make_smoke_task.py`; nothing is downloaded."""

from __future__ import annotations

import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def smoke_doc_to_visual(doc: dict) -> list:
    """The doc's image as a one-element list of RGB PIL images."""
    path = os.path.join(HERE, doc["image"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"otprune_smoke: image {path} is missing; run `python scripts/make_smoke_task.py`")
    with Image.open(path) as image:
        return [image.convert("RGB")]


def smoke_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, with the short-answer instruction for the generation task."""
    post = POST_PROMPT if lmms_eval_specific_kwargs is None else lmms_eval_specific_kwargs.get("post_prompt", "")
    pre = "" if lmms_eval_specific_kwargs is None else lmms_eval_specific_kwargs.get("pre_prompt", "")
    return f"{pre}{doc['question']}{post}"


def smoke_doc_to_choice(doc: dict) -> list[str]:
    """The multiple-choice options (scored by the model's likelihood of each)."""
    return list(doc["choices"])


def _option_loss(result) -> float:
    """The first element of one loglikelihood result `(value, is_greedy)`.

    lmms-eval 0.7.3 hands multiple-choice results to `process_results` as strings such as
    "(1.25, False)" (its output unwrapping turns every non-string model output into `str`),
    so both the tuple and its string form are accepted here.
    """
    if isinstance(result, str):
        head = result.strip().lstrip("([").split(",")[0].strip()
        return float(head)
    return float(result[0])


def smoke_mc_process_results(doc: dict, results: list) -> dict:
    """Accuracy of one multiple-choice question.

    The `llava` wrapper of lmms-eval returns, per option, the mean negative log-likelihood of
    the option's tokens (lower is better; lmms-eval's own multiple-choice scoring also takes the
    argmin), so the prediction is the option with the smallest value (first one on ties).
    """
    losses = [_option_loss(result) for result in results]
    if len(losses) != len(doc["choices"]):
        raise ValueError(f"otprune_smoke_mc: {len(losses)} results for {len(doc['choices'])} options (doc {doc['id']})")
    prediction = min(range(len(losses)), key=losses.__getitem__)
    return {"acc": float(prediction == doc["label"])}
