"""Independent, deliberately naive references (numpy, fp64, explicit loops) for the 2025 baselines:
VisionZip and DART, written from their papers' descriptions."""

from __future__ import annotations

import numpy as np


def visionzip_oracle(hidden, q, keys, heads, dominant, ctx):
    """hidden (T, D), q (C,), keys (T, C), T = 1 + N -> (tokens (K, D), sources list)."""
    t, c = keys.shape
    hd = c // heads
    score = np.zeros(t - 1)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = np.array([q[sl] @ keys[j, sl] / np.sqrt(hd) for j in range(t)])
        e = np.exp(logits - logits.max())
        score += (e / e.sum())[1:]
    best = sorted(range(t - 1), key=lambda p: -score[p])[: dominant - 1]
    kept = [0] + sorted(p + 1 for p in best)
    rest = [j for j in range(t) if j not in kept]
    metric = np.stack([keys[j].reshape(heads, hd).mean(axis=0) for j in range(t)])
    metric = metric / np.linalg.norm(metric, axis=1, keepdims=True)
    step = max(1, len(rest) // ctx)
    targets = rest[::step][:ctx]
    groups = {tg: [] for tg in targets}
    for j in rest:
        if j in targets:
            continue
        sims = [metric[j] @ metric[tg] for tg in targets]
        groups[targets[int(np.argmax(sims))]].append(j)
    ctx_tokens = [hidden[tg] + (np.mean([hidden[j] for j in groups[tg]], axis=0) if groups[tg] else 0) for tg in targets]
    tokens = np.stack([hidden[j] for j in kept] + ctx_tokens)
    sources = [-3] + [j - 1 for j in kept[1:]] + [tg - 1 for tg in targets]
    return tokens, sources


def dart_oracle(ik, istate, tk, tstate, k, pi, pt, start):
    v = len(ik)
    l1_img = [np.abs(row).sum() for row in ik]
    l1_txt = [np.abs(row).sum() for row in tk]
    img_piv = sorted(range(v), key=lambda i: -l1_img[i])[:pi]
    txt_piv = sorted(range(len(tk)), key=lambda j: -l1_txt[j])[:pt]
    per = k // (pi + pt)
    free = [i for i in range(v) if i not in img_piv]
    kept = list(img_piv)
    positions = [start + i for i in img_piv] + [start + v + j for j in txt_piv]
    for pos in set(positions):  # the official processing order: Python's set of sequence positions
        vec = istate[pos - start] if pos - start < v else tstate[pos - start - v]
        cos = {i: istate[i] @ vec / (np.linalg.norm(istate[i]) * np.linalg.norm(vec)) for i in free}
        far = sorted(free, key=lambda i: cos[i])[: min(per, len(free))]
        kept += far
        free = [i for i in free if i not in far]
    return sorted(kept)
