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


# ------------------------------------------------------------------ partial labels (marginal loss)

def _partial_case(seed=0, c=5):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(1, c, 4, 6, 6, generator=g)
    target = torch.randint(0, 3, (1, 4, 6, 6), generator=g)  # classes 0..2 annotated; 3, 4 are not
    annotated = torch.tensor([[True, True, True, False, False]])
    return logits, target, annotated


@pytest.mark.parametrize("name", LOSSES)
def test_marginal_loss_equals_the_plain_loss_of_the_reduced_problem(name):
    """Independent truth: merge the un-annotated classes into background by hand (logsumexp of logits)."""
    logits, target, annotated = _partial_case()
    loss = build_loss(name, alpha=0.5)
    reduced = torch.cat([torch.logsumexp(logits[:, [0, 3, 4]], dim=1, keepdim=True), logits[:, 1:3]], dim=1)
    assert loss(logits, target, annotated=annotated).item() == pytest.approx(loss(reduced, target).item(), rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_marginal_loss_ignores_how_unannotated_mass_splits_from_background(name):
    logits, target, annotated = _partial_case(seed=1)
    loss = build_loss(name, alpha=1.0)
    base = loss(logits, target, annotated=annotated)
    # new logits for the un-annotated classes 3, 4 and background, with the same merged logsumexp
    g = torch.Generator().manual_seed(7)
    other = logits.clone()
    other[:, 3:] = logits[:, 3:] + 4 * torch.randn(logits[:, 3:].shape, generator=g)
    merged = torch.logsumexp(logits[:, [0, 3, 4]], dim=1)
    rest = torch.logsumexp(other[:, 3:], dim=1)
    # choose the background logit so that logsumexp(l0, l3, l4) is unchanged (needs merged > rest)
    other[:, 3:] -= (rest - merged + 1.0).clamp_min(0).unsqueeze(1)
    rest = torch.logsumexp(other[:, 3:], dim=1)
    other[:, 0] = merged + torch.log1p(-torch.exp(rest - merged))
    assert torch.allclose(torch.logsumexp(other[:, [0, 3, 4]], dim=1), merged, atol=1e-5)
    assert not torch.allclose(other, logits)
    assert loss(other, target, annotated=annotated).item() == pytest.approx(base.item(), rel=1e-4)
    # the plain loss does see the change: it trains classes 3 and 4 as background
    assert loss(other, target).item() != pytest.approx(loss(logits, target).item(), rel=1e-3)


@pytest.mark.parametrize("name", LOSSES)
def test_all_annotated_equals_the_plain_loss_and_gradients_are_finite(name):
    logits, target, _ = _partial_case(seed=2)
    loss = build_loss(name)
    full = torch.ones(1, 5, dtype=torch.bool)
    assert loss(logits, target, annotated=full).item() == loss(logits, target).item()
    x = logits.clone().requires_grad_(True)
    loss(x, target, annotated=torch.tensor([[True, True, True, False, False]])).backward()
    assert torch.isfinite(x.grad).all()


def test_mixed_batch_each_case_by_its_own_annotation():
    """Case 0 annotates everything, case 1 lacks classes 3, 4: case 1's un-annotated logits do not matter,
    and a class that no case annotates leaves the Dice mean (same as dropping it from the problem)."""
    g = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(2, 5, 4, 4, 4, generator=g)
    target = torch.randint(0, 5, (2, 4, 4, 4), generator=g)
    target[1][target[1] >= 3] = 0
    ann = torch.tensor([[True] * 5, [True, True, True, False, False]])
    loss = build_loss("exp_log")
    a = loss(logits, target, annotated=ann)
    moved = logits.clone()
    moved[1, 3:] -= 50.0  # un-annotated mass of case 1 moved into its background
    moved[1, 0] = torch.logsumexp(logits[1, [0, 3, 4]], dim=0)
    assert loss(moved, target, annotated=ann).item() == pytest.approx(a.item(), rel=1e-4)
    # class 4 annotated nowhere and absent: same as the 4-class problem without it
    t2 = target.clone()
    t2[t2 == 4] = 0
    ann2 = torch.tensor([[True, True, True, True, False]] * 2)
    reduced = torch.cat([torch.logsumexp(logits[:, [0, 4]], dim=1, keepdim=True), logits[:, 1:4]], dim=1)
    assert loss(logits, t2, annotated=ann2).item() == pytest.approx(loss(reduced, t2).item(), rel=1e-5)


def test_annotated_errors():
    logits, target, annotated = _partial_case()
    loss = build_loss("dice")
    with pytest.raises(ValueError, match=r"annotated must be \(B, C\)"):
        loss(logits, target, annotated=annotated[:, :3])
    target[0, 0, 0, 0] = 4
    with pytest.raises(ValueError, match="contains class 4"):
        loss(logits, target, annotated=annotated)
