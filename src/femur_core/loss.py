"""Losses: the study's class-weighted cross-entropy (eq. 1) and Dice + cross-entropy.

Both take logits of shape (B, C, ...) and an integer target of shape (B, ...)
and return a scalar. C is 2 (background, femur) for the study's loss; Dice + CE
also takes C > 2 (an extra "other bone" class, see ``TrainConfig.aux_labels``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["weighted_cross_entropy", "dice_cross_entropy", "LOSSES", "get_loss"]


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy of Deniz et al. (2018), per image.

    ``CE = -(1/N) sum_i [(Nb/N) y_i log p_i + (Np/N) (1 - y_i) log(1 - p_i)]``
    with N voxels of which Np femur and Nb background, p the softmax femur
    probability; the rare femur class gets the large weight Nb/N. Weights are
    computed per image of the batch and the losses averaged over the batch.
    """
    if logits.shape[1] != 2:
        raise ValueError(f"the study's weighted cross-entropy is for 2 classes, got {logits.shape[1]}; "
                         "use dice_ce for label maps with more classes")
    logp = F.log_softmax(logits.float(), dim=1)
    y = target.float()
    dims = tuple(range(1, y.ndim))
    n = float(y[0].numel())
    n_pos = y.sum(dim=dims, keepdim=True)
    w_pos = (n - n_pos) / n  # Nb / N
    w_neg = n_pos / n  # Np / N
    per_voxel = w_pos * y * logp[:, 1] + w_neg * (1 - y) * logp[:, 0]
    return -per_voxel.mean(dim=dims).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over each image, averaged over the foreground classes and the batch.

    With two classes this is the soft Dice of the femur class alone.
    """
    probs = torch.softmax(logits.float(), dim=1)
    dims = tuple(range(1, target.ndim))
    per_class = []
    for c in range(1, probs.shape[1]):
        p = probs[:, c]
        y = (target == c).float()
        inter = (p * y).sum(dims)
        denom = p.sum(dims) + y.sum(dims)
        per_class.append(1 - (2 * inter + eps) / (denom + eps))
    return torch.stack(per_class).mean()


def dice_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss plus unweighted cross-entropy (nnU-Net's default)."""
    return soft_dice_loss(logits, target) + F.cross_entropy(logits.float(), target.long())


#: The one list of losses that the CLI and the GUI offer.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "wce": weighted_cross_entropy,
    "dice_ce": dice_cross_entropy,
}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
