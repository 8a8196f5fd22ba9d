"""The original's optimizer: Adam over a list holding the caption branch twice, clipping included."""

import pytest
import torch
from torch import nn

from utils.optim import CaptionRepeatingAdam


def original_list_step(listed, state, lr, max_norm, betas=(0.9, 0.999), eps=1e-8):
    """torch 0.4's clip_grad_norm_ then Adam.step over a parameter list, duplicates included:
    every occurrence counts in the norm and is scaled, then takes an Adam update from its
    (unchanged) gradient through the one state it shares with its other occurrences. The
    update is written in torch 2's form (eps added after the bias correction), as the port's."""
    total_norm = sum(p.grad.norm() ** 2 for p in listed) ** 0.5
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1:
        for p in listed:
            p.grad.mul_(coef)
    for p in listed:
        s = state.setdefault(id(p), {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        s["step"] += 1
        s["m"] = betas[0] * s["m"] + (1 - betas[0]) * p.grad
        s["v"] = betas[1] * s["v"] + (1 - betas[1]) * p.grad * p.grad
        denom = (s["v"].sqrt() / (1 - betas[1] ** s["step"]) ** 0.5) + eps
        with torch.no_grad():
            p -= lr / (1 - betas[0] ** s["step"]) * s["m"] / denom
    return total_norm


@pytest.mark.parametrize("caption_updates", [2, 1])
def test_caption_repeating_adam_equals_adam_over_the_originals_list(caption_updates):
    torch.manual_seed(0)
    shapes = {"img": (4, 3), "txt": (5,), "decoder": (3, 2), "encoder": (6,)}
    ours = {k: nn.Parameter(torch.randn(s)) for k, s in shapes.items()}
    theirs = {k: nn.Parameter(p.detach().clone()) for k, p in ours.items()}
    optimizer = CaptionRepeatingAdam(
        [ours["img"], ours["txt"]], [ours["decoder"], ours["encoder"]], 0.01, caption_updates
    )
    # The original's list: text and image encoders, decoder, encoder, then the caption model (encoder, decoder).
    listed = [theirs["txt"], theirs["img"], theirs["decoder"], theirs["encoder"]]
    listed += [theirs["encoder"], theirs["decoder"]] * (caption_updates - 1)
    state = {}
    for step, scale in enumerate((3.0, 0.01, 5.0)):  # clipping active, inactive, active
        grads = {k: scale * torch.randn(s) for k, s in shapes.items()}
        for k in shapes:
            ours[k].grad, theirs[k].grad = grads[k].clone(), grads[k].clone()
        norm = optimizer.clip_grad_norm_(2.0)
        optimizer.step()
        expected_norm = original_list_step(listed, state, 0.01, 2.0)
        torch.testing.assert_close(norm, expected_norm)
        for k in shapes:
            torch.testing.assert_close(ours[k].grad, theirs[k].grad, rtol=1e-6, atol=1e-7, msg=f"{k} grad, step {step}")
            torch.testing.assert_close(
                ours[k].detach(), theirs[k].detach(), rtol=1e-6, atol=1e-7, msg=f"{k}, step {step}"
            )
    steps = {k: int(optimizer.adam.state[p]["step"]) for k, p in ours.items()}
    assert steps == {"img": 3, "txt": 3, "decoder": 3 * caption_updates, "encoder": 3 * caption_updates}
    assert all(ours[k].grad is not None for k in shapes)
