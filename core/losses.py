"""Segmentation losses on logits (paper Sec. 3.3, docs/conventions.md).

All losses take ``logits`` (B, C, Z, Y, X) of any float dtype and ``target`` (B, Z, Y, X) int64 class ids
in [0, C) and return a float32 scalar. They always compute in float32 with autocast disabled (safe under
float16/bfloat16 autocast), use ``log_softmax`` for the cross-entropy and clamp the logarithms' arguments,
so logits of +-1e4 give finite values and gradients.

Conventions (choices where the paper is silent):

* Soft Dice per class c over the whole batch (all samples and voxels pooled):
  ``DSC_c = (2 * sum p_c g_c + eps) / (sum p_c + sum g_c + eps)``, eps = 1 (the reference code's 22 was a
  bug), all C classes including background. A class absent from the batch (sum g_c = 0) has
  ``DSC_c = 1 / (1 + sum p_c)``: finite, 1 when nothing is predicted, and it pushes p_c down otherwise.
* ``dice``: ``1 - mean_c DSC_c``.
* ``exp_log`` (L_Exp): ``w_dsc * mean_c[(-ln DSC_c)^gamma_dsc] + w_ce * mean_x[w_c(x) (-ln p_c(x)(x))^gamma_ce]``
  with c(x) the true class of voxel x and ``w_c = (sum_k f_k / f_c)^0.5``, f the class voxel counts in the
  batch. A class with f_c = 0 has no voxels, so it contributes nothing to the CE term (w_c is set to 0,
  never inf).
* ``ath_exp_log``: like ``exp_log`` but the Dice term sees ``p^w = p * exp((p - g) / alpha)`` (ATH,
  differentiable, not detached); the CE term is the plain one (unweighted by ATH), as in the reference code.

Partial labels (``annotated``, a (B, C) bool mask of the classes each case's dataset annotates; background
is always annotated): a **marginal** loss (Shi et al. 2021; Fang & Yan 2020). For case b the probabilities
of its un-annotated classes U_b are merged into background, ``p'_0 = p_0 + sum_{c in U_b} p_c`` (in log
space: a logsumexp), and U_b leaves that case's Dice sums; the target may not contain a class of U_b. So a
voxel labelled background in a case without eyes may be background *or* eye, and predicting an eye there
costs nothing. A class annotated in no case of the batch is left out of the Dice mean. The loss of one case
equals the plain loss on its reduced problem (classes {0 merged} + its annotated ones), and with every
class annotated it equals the plain loss exactly.
"""

from __future__ import annotations

import torch
from torch import nn

LOSSES: tuple[str, ...] = ("dice", "exp_log", "ath_exp_log")
_TINY = 1e-12  # floor for the bases of fractional powers: keeps d/dx x^g finite at x = 0


def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float32 logits and int64 target."""
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, C, ...spatial), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} without the class axis"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    c = logits.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
        raise ValueError(f"target ids must lie in [0, {c}), got range [{int(target.min())}, {int(target.max())}]")
    return logits.float(), target.long()


def _annotated_mask(annotated, target: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """(B, C) bool mask with background forced True, or None when every class is annotated."""
    if annotated is None:
        return None
    m = torch.as_tensor(annotated, dtype=torch.bool, device=target.device)
    if m.shape != (target.shape[0], num_classes):
        raise ValueError(f"annotated must be (B, C) = {(target.shape[0], num_classes)}, got {tuple(m.shape)}")
    m = m.clone()
    m[:, 0] = True
    if bool(m.all()):
        return None
    hit = torch.zeros_like(m)
    hit.scatter_(1, target.reshape(target.shape[0], -1), True)
    if bool((hit & ~m).any()):
        b, c = map(int, torch.nonzero(hit & ~m)[0])
        raise ValueError(f"target of case {b} contains class {c}, which annotated marks as not annotated")
    return m


def _marginal_log_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log p' (B, C, ...): log-softmax with each case's un-annotated classes merged into background
    (their entries -inf, i.e. p' = 0); the plain log-softmax when ``mask`` is None."""
    logp = torch.log_softmax(logits, dim=1)
    if mask is None:
        return logp
    shape = (*mask.shape, *([1] * (logits.dim() - 2)))
    unann = (~mask).view(shape)
    into_bg = unann.clone()
    into_bg[:, 0] = True
    merged = torch.logsumexp(logp.masked_fill(~into_bg, float("-inf")), dim=1)  # background is finite
    out = logp.masked_fill(unann, float("-inf"))
    return torch.cat([merged.unsqueeze(1), out[:, 1:]], dim=1)


def _class_mean(per_class: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over classes, leaving out those annotated in no case of the batch."""
    if mask is None:
        return per_class.mean()
    used = mask.any(0)
    return per_class[used].mean()


def _one_hot(target: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """(B, Z, Y, X) ids -> float (B, C, Z, Y, X) one-hot with the dtype/device of ``like``."""
    return torch.zeros_like(like).scatter_(1, target.unsqueeze(1), 1.0)


def soft_dice_per_class(prob: torch.Tensor, onehot: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """(C,) soft Dice of ``prob`` vs ``onehot`` (both (B, C, ...)), pooled over batch and voxels."""
    dims = [0] + list(range(2, prob.dim()))
    inter = (prob * onehot).sum(dims)
    den = prob.sum(dims) + onehot.sum(dims)
    return (2.0 * inter + eps) / (den + eps)


def _neg_log_dice(prob: torch.Tensor, onehot: torch.Tensor, eps: float) -> torch.Tensor:
    """(C,) -ln DSC_c computed as ln(den) - ln(num), clamped at 0 (DSC <= 1 up to rounding)."""
    dims = [0] + list(range(2, prob.dim()))
    num = 2.0 * (prob * onehot).sum(dims) + eps
    den = prob.sum(dims) + onehot.sum(dims) + eps
    return (torch.log(den) - torch.log(num)).clamp_min(0.0)


def class_weights(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) float32 ``w_c = (sum_k f_k / f_c)^0.5`` from the batch's voxel counts; 0 where f_c = 0."""
    f = torch.bincount(target.reshape(-1), minlength=num_classes).to(torch.float32)
    w = torch.sqrt(f.sum() / f.clamp_min(1.0))
    return torch.where(f > 0, w, torch.zeros_like(w))


def _pow(x: torch.Tensor, gamma: float) -> torch.Tensor:
    if gamma == 1:
        return x
    return x.clamp_min(_TINY) ** gamma


class DiceLoss(nn.Module):
    """``1 - mean_c DSC_c`` with smoothing ``eps`` (default 1); see the module docstring."""

    def __init__(self, *, eps: float = 1.0):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, *, annotated=None) -> torch.Tensor:
        """Scalar loss; ``annotated`` (B, C) bool or None (all annotated): see the module docstring."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = _prepare(logits, target)
            mask = _annotated_mask(annotated, target, logits.shape[1])
            prob = _marginal_log_softmax(logits, mask).exp()
            onehot = _one_hot(target, logits.shape[1], prob)
            return 1.0 - _class_mean(soft_dice_per_class(prob, onehot, eps=self.eps), mask)


class ExpLogLoss(nn.Module):
    """Exponential logarithmic loss L_Exp (Wong et al. 2018), optionally with ATH on the Dice term.

    Args:
        w_dsc, w_ce: weights of the Dice and cross-entropy terms.
        gamma_dsc, gamma_ce: exponents of the two terms (> 0).
        eps: Dice smoothing (default 1).
        alpha: ATH temperature; None = plain L_Exp.
    """

    def __init__(
        self,
        *,
        w_dsc: float = 1.0,
        w_ce: float = 1.0,
        gamma_dsc: float = 1.0,
        gamma_ce: float = 1.0,
        eps: float = 1.0,
        alpha: float | None = None,
    ):
        super().__init__()
        for key, val in (("gamma_dsc", gamma_dsc), ("gamma_ce", gamma_ce), ("eps", eps)):
            if val <= 0:
                raise ValueError(f"{key} must be > 0, got {val}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if w_dsc < 0 or w_ce < 0:
            raise ValueError(f"w_dsc and w_ce must be >= 0, got {w_dsc}, {w_ce}")
        self.w_dsc, self.w_ce = float(w_dsc), float(w_ce)
        self.gamma_dsc, self.gamma_ce = float(gamma_dsc), float(gamma_ce)
        self.eps = float(eps)
        self.alpha = None if alpha is None else float(alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, *, annotated=None) -> torch.Tensor:
        """Scalar loss; ``annotated`` (B, C) bool or None (all annotated): see the module docstring."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = _prepare(logits, target)
            c = logits.shape[1]
            mask = _annotated_mask(annotated, target, c)
            logp = _marginal_log_softmax(logits, mask)
            prob = logp.exp()
            onehot = _one_hot(target, c, prob)
            if self.alpha is not None:
                # ATH: p^w = p * exp((p - g) / alpha); p - g in [-1, 1] so exp never overflows
                prob = prob * torch.exp((prob - onehot) / self.alpha)
            dice_term = _class_mean(_pow(_neg_log_dice(prob, onehot, self.eps), self.gamma_dsc), mask)
            nll = (-logp.gather(1, target.unsqueeze(1)).squeeze(1)).clamp_min(0.0)
            w = class_weights(target, c).to(nll.device)[target]
            ce_term = (w * _pow(nll, self.gamma_ce)).mean()
            return self.w_dsc * dice_term + self.w_ce * ce_term


class ATHExpLogLoss(ExpLogLoss):
    """L_Exp with adaptive thresholding (ATH) ``p^w = p * exp((p - g) / alpha)`` on the Dice term."""

    def __init__(self, alpha: float = 0.5, **kw):
        super().__init__(alpha=alpha, **kw)


def build_loss(
    name: str,
    *,
    alpha: float = 0.5,
    w_dsc: float = 1.0,
    w_ce: float = 1.0,
    gamma_dsc: float = 1.0,
    gamma_ce: float = 1.0,
    eps: float = 1.0,
) -> nn.Module:
    """Loss by name: "dice" (uses eps), "exp_log" (all but alpha), "ath_exp_log" (all).

    Raises:
        ValueError: unknown name (the message lists the known ones) or an invalid value.
    """
    if name == "dice":
        return DiceLoss(eps=eps)
    kw = dict(w_dsc=w_dsc, w_ce=w_ce, gamma_dsc=gamma_dsc, gamma_ce=gamma_ce, eps=eps)
    if name == "exp_log":
        return ExpLogLoss(**kw)
    if name == "ath_exp_log":
        return ATHExpLogLoss(alpha=alpha, **kw)
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
