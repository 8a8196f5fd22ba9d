"""The optimizer of training: Adam, with the original's repeated updates of the caption branch."""

import torch


def make_adam(params, lr):
    """Adam as one fused kernel over all parameters (same update rule) where torch has it
    for the device (CUDA; CPU since torch 2.4), the per-parameter loop otherwise."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


class CaptionRepeatingAdam:
    """Adam over every parameter, the caption branch's updated `caption_updates` times per step.

    The original passed Adam one list that held the caption branch's parameters twice (the
    decoder's, the encoder's, then the caption model's, which are both again). PyTorch 0.4's
    Adam walked that list, so each of those parameters took two Adam updates per step from
    the same gradient, through one shared state (step count and moments), and its
    clip_grad_norm_ walked the same list, so their gradients counted twice in the norm and
    were scaled twice. `caption_updates=2` does exactly that while listing each parameter
    once (torch 2 warns about duplicates and does not promise to honour them); 1 updates
    every parameter once.
    """

    def __init__(self, retrieval_params, caption_params, lr, caption_updates=2):
        self.retrieval_params = list(retrieval_params)
        self.caption_params = list(caption_params)
        self.caption_updates = caption_updates
        self.adam = make_adam(self.retrieval_params + self.caption_params, lr)

    @property
    def param_groups(self):
        return self.adam.param_groups

    def state_dict(self):
        return self.adam.state_dict()

    def load_state_dict(self, state_dict):
        self.adam.load_state_dict(state_dict)

    def zero_grad(self, set_to_none=True):
        self.adam.zero_grad(set_to_none=set_to_none)

    def clip_grad_norm_(self, max_norm):
        """torch 0.4's clip_grad_norm_ over the original's list; returns the total norm.

        Norm of all gradients with the caption branch's counted `caption_updates` times;
        when it exceeds max_norm, every listed occurrence is scaled by max_norm / (norm + 1e-6).
        """
        retrieval = [p.grad for p in self.retrieval_params if p.grad is not None]
        caption = [p.grad for p in self.caption_params if p.grad is not None]
        squares = [torch.linalg.vector_norm(g).square() for g in retrieval]
        squares += [self.caption_updates * torch.linalg.vector_norm(g).square() for g in caption]
        if not squares:
            return torch.zeros(())
        total_norm = torch.stack(squares).sum().sqrt()
        scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        if retrieval:
            torch._foreach_mul_(retrieval, scale)
        for _ in range(self.caption_updates if caption else 0):
            torch._foreach_mul_(caption, scale)
        return total_norm

    def step(self):
        self.adam.step()
        if self.caption_updates == 1:
            return
        # The caption branch again, from the same gradients: Adam skips parameters without one.
        retrieval_grads = [p.grad for p in self.retrieval_params]
        for p in self.retrieval_params:
            p.grad = None
        try:
            for _ in range(self.caption_updates - 1):
                self.adam.step()
        finally:
            for p, grad in zip(self.retrieval_params, retrieval_grads):
                p.grad = grad
