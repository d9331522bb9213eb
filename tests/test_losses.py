from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sepnet.core.losses import LOSSES, ATHExpLogLoss, DiceLoss, ExpLogLoss, build_loss

# A 2-class 2x2x2 case whose softmax probabilities are simple: logits (0, ln 3) -> p1 = 3/4, (0, 0) -> 1/2,
# (ln 3, 0) -> p1 = 1/4. Voxels in flattened order:
P1 = [0.75, 0.75, 0.5, 0.25, 0.25, 0.5, 0.5, 0.5]
G1 = [1, 1, 1, 0, 0, 0, 0, 0]  # 3 voxels of class 1, 5 of class 0


def _case():
    l1 = [math.log(p / (1 - p)) for p in P1]  # logit of class 1 with class-0 logit 0
    logits = torch.tensor([[0.0] * 8, l1], dtype=torch.float32).reshape(1, 2, 2, 2, 2)
    target = torch.tensor(G1, dtype=torch.long).reshape(1, 2, 2, 2)
    return logits, target


def _hand_dsc(p1, g1, eps=1.0):
    """Per-class soft Dice, by plain arithmetic."""
    out = []
    for p, g in ((1 - np.asarray(p1), 1 - np.asarray(g1)), (np.asarray(p1), np.asarray(g1))):
        out.append((2 * np.sum(p * g) + eps) / (np.sum(p) + np.sum(g) + eps))
    return out


def test_hand_dsc_values():
    # class 1: inter 2.0, sum p 4, sum g 3 -> 5/8; class 0: inter 3.0, sum p 4, sum g 5 -> 7/10
    d0, d1 = _hand_dsc(P1, G1)
    assert d1 == pytest.approx(5 / 8) and d0 == pytest.approx(7 / 10)


def test_dice_loss_hand_computed():
    logits, target = _case()
    val = DiceLoss()(logits, target)
    assert val.dtype == torch.float32 and val.dim() == 0
    assert val.item() == pytest.approx(1 - (5 / 8 + 7 / 10) / 2, abs=1e-6)


def _hand_ce_terms():
    # w_c = sqrt(N / f_c): f1 = 3, f0 = 5, N = 8; nll = -ln p_true
    w1, w0 = math.sqrt(8 / 3), math.sqrt(8 / 5)
    nll1 = [-math.log(0.75), -math.log(0.75), -math.log(0.5)]  # class-1 voxels
    nll0 = [-math.log(0.75), -math.log(0.75), -math.log(0.5), -math.log(0.5), -math.log(0.5)]  # p0 = 1 - p1
    return [(w1, v) for v in nll1] + [(w0, v) for v in nll0]


def test_exp_log_hand_computed():
    logits, target = _case()
    dice = (-math.log(5 / 8) - math.log(7 / 10)) / 2
    ce = sum(w * v for w, v in _hand_ce_terms()) / 8
    assert ExpLogLoss()(logits, target).item() == pytest.approx(dice + ce, rel=1e-6)
    # weights and gammas
    dice2 = ((-math.log(5 / 8)) ** 2 + (-math.log(7 / 10)) ** 2) / 2
    ce2 = sum(w * v**0.5 for w, v in _hand_ce_terms()) / 8
    loss = build_loss("exp_log", w_dsc=0.3, w_ce=2.0, gamma_dsc=2.0, gamma_ce=0.5)
    assert loss(logits, target).item() == pytest.approx(0.3 * dice2 + 2.0 * ce2, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_ath_exp_log_hand_computed(alpha):
    logits, target = _case()
    p1, g1 = np.array(P1), np.array(G1)
    pw1 = p1 * np.exp((p1 - g1) / alpha)
    pw0 = (1 - p1) * np.exp(((1 - p1) - (1 - g1)) / alpha)
    dsc1 = (2 * np.sum(pw1 * g1) + 1) / (np.sum(pw1) + 3 + 1)
    dsc0 = (2 * np.sum(pw0 * (1 - g1)) + 1) / (np.sum(pw0) + 5 + 1)
    dice = (-math.log(dsc1) - math.log(dsc0)) / 2
    ce = sum(w * v for w, v in _hand_ce_terms()) / 8  # CE is not ATH-weighted
    assert ATHExpLogLoss(alpha=alpha)(logits, target).item() == pytest.approx(dice + ce, rel=1e-6)
    assert build_loss("ath_exp_log", alpha=alpha)(logits, target).item() == pytest.approx(dice + ce, rel=1e-6)


def _hard_voxel_case(hard_p: float):
    """64 voxels, class 1 = first half; every voxel is predicted right with p = 0.95 except voxel 0 (class 1),
    predicted with p1 = hard_p: a hard voxel inside an otherwise easy class."""
    n = 64
    target = torch.zeros(n, dtype=torch.long)
    target[: n // 2] = 1
    p1 = torch.where(target == 1, torch.tensor(0.95), torch.tensor(0.05))
    p1[0] = hard_p
    logits = torch.stack([torch.zeros(n), torch.log(p1 / (1 - p1))]).reshape(1, 2, 4, 4, 4)
    return logits.clone().requires_grad_(True), target.reshape(1, 4, 4, 4)


@pytest.mark.parametrize("hard_p", [0.05, 0.3])
@pytest.mark.parametrize("w_ce", [1.0, 0.0])
def test_ath_gradient_larger_on_hard_voxel(hard_p, w_ce):
    grads = {}
    for name in ("exp_log", "ath_exp_log"):
        logits, target = _hard_voxel_case(hard_p)
        build_loss(name, alpha=0.5, w_ce=w_ce)(logits, target).backward()
        g = logits.grad.reshape(2, -1)
        grads[name] = (g[:, 0].norm().item(), g[:, 5].norm().item())  # (hard, an easy class-1 voxel)
    hard_plain, easy_plain = grads["exp_log"]
    hard_ath, easy_ath = grads["ath_exp_log"]
    assert hard_ath > 1.2 * hard_plain
    if w_ce == 0:  # in the Dice term, where ATH acts, attention shifts towards the hard voxel
        assert hard_ath / easy_ath > 2 * hard_plain / easy_plain


@pytest.mark.parametrize("name", LOSSES)
def test_adam_reduces_loss(name):
    gen = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 4, 6, 6, dtype=torch.long)
    target[:, 1:3, 1:4, 1:4] = 1
    target[:, 2:4, 3:5, 2:5] = 2
    logits = (0.1 * torch.randn(2, 3, 4, 6, 6, generator=gen)).requires_grad_(True)
    loss_fn = build_loss(name)
    opt = torch.optim.Adam([logits], lr=0.1)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(logits, target)
        if first is None:
            first = loss.item()
        loss.backward()
        opt.step()
    assert loss_fn(logits, target).item() < 0.5 * first


@pytest.mark.parametrize("name", LOSSES)
def test_absent_class_and_extreme_logits_are_finite(name):
    target = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    target[0, :, :2] = 1  # class 2 of 3 is absent
    for scale in (1e4, -1e4):
        logits = torch.zeros(1, 3, 2, 4, 4)
        logits[:, 0] = scale  # confident background: very wrong on class-1 voxels (or right, for -1e4)
        logits[:, 1] = -scale
        logits.requires_grad_(True)
        loss = build_loss(name)(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # perfect confident prediction with an absent class: loss ~ 0 (absent class Dice = 1 with eps smoothing)
    logits = torch.full((1, 3, 2, 4, 4), -1e4)
    logits.scatter_(1, target.unsqueeze(1), 1e4)
    assert build_loss(name)(logits, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_float16_logits_and_autocast(name):
    logits, target = _case()
    ref = build_loss(name)(logits, target)
    half = build_loss(name)(logits.half(), target)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(ref.item(), rel=1e-3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = build_loss(name)(logits, target)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), rel=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="dice, exp_log, ath_exp_log"):
        build_loss("focal")
    logits, target = _case()
    with pytest.raises(ValueError, match="target shape"):
        DiceLoss()(logits, target[:, :1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ExpLogLoss()(logits, target + 1)
    with pytest.raises(ValueError, match="alpha"):
        build_loss("ath_exp_log", alpha=0.0)
