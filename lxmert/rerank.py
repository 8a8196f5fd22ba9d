"""Two-stage retrieval: a first stage's top-k per query, rescored by a second stage (LXMERT),
optionally fused with the first stage's scores."""

import math

import torch


def top_candidates(scores, topk, dim):
    """Boolean mask of each query's `topk` best targets, and of every target tied with its k-th
    (so none is left out by chance); queries run along the other dimension."""
    scores = torch.as_tensor(scores)
    k = min(topk, scores.shape[dim])
    kth = scores.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    return scores >= kth


def rerank(first_stage, second_stage, candidates, alpha=1.0):
    """Scores (queries x targets, float64) of two-stage retrieval.

    Each query's candidates rank by `alpha * second_stage + (1 - alpha) * first_stage`, all
    above its other targets, which keep the first stage's order (shifted below the candidates).
    """
    first = torch.as_tensor(first_stage, dtype=torch.float64)
    second = torch.as_tensor(second_stage, dtype=torch.float64)
    candidates = torch.as_tensor(candidates, dtype=torch.bool)
    result = torch.empty(first.shape, dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, first.shape[1]))
    for start in range(0, len(first), step):
        rows = slice(start, start + step)
        chosen, base = candidates[rows], first[rows]
        fused = alpha * second[rows] + (1 - alpha) * base if alpha != 1 else second[rows]
        lowest_chosen = torch.where(chosen, fused, math.inf).amin(1, keepdim=True)
        highest_other = torch.where(chosen, -math.inf, base).amax(1, keepdim=True)
        shift = (highest_other - lowest_chosen + 1).clamp(min=0)
        result[rows] = torch.where(chosen, fused, base - shift)
    return result
