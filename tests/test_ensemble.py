from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sepnet.core.ensemble import (
    FusionAccumulator,
    default_rank_weights,
    entropy_levels,
    fuse,
    fusion_weights,
    member_volumes,
    pool_weights,
    quantise_levels,
    rank_weights,
    vote_entropy,
    vvc,
)
from sepnet.core.errors import ConfigError

# The paper's six observed levels (Sec. 4.1.3) and the list in docs/conventions.md, rounded to 4 decimals.
SIX_VOTER_LEVELS = [0.0, 0.4506, 0.6365, 0.6931, 0.8676, 1.0114, 1.0986, 1.2425]


def test_default_rank_weights_paper_and_generalisation():
    assert default_rank_weights(6) == (5, 4, 3, 1, 1, 1)
    assert default_rank_weights(4) == (3, 2, 1, 1)
    assert default_rank_weights(3) == (2, 1, 1)
    assert default_rank_weights(2) == (1, 1)
    assert default_rank_weights(1) == (1,)
    assert default_rank_weights(8) == (7, 6, 5, 4, 1, 1, 1, 1)


def test_rank_weights_six_members_paper():
    # class 0: member 5 best ... member 0 worst; class 1: member order as given
    dice = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5], [0.6, 0.4]])
    w = rank_weights(dice)
    np.testing.assert_array_equal(w[:, 0], [1, 1, 1, 3, 4, 5])
    np.testing.assert_array_equal(w[:, 1], [5, 4, 3, 1, 1, 1])


def test_rank_weights_three_members_ties_and_nan():
    # hand-ranked with weights (2, 1, 1):
    # class 0: dice (0.5, 0.7, 0.6) -> ranks m1, m2, m0 -> w = (1, 2, 1)
    # class 1: tie (0.8, 0.8, 0.3) -> lower index first: m0, m1, m2 -> w = (2, 1, 1)
    # class 2: NaN for m0 ranks last: (nan, 0.1, 0.2) -> m2, m1, m0 -> w = (1, 1, 2)
    dice = np.array([[0.5, 0.8, np.nan], [0.7, 0.8, 0.1], [0.6, 0.3, 0.2]])
    w = rank_weights(dice)
    np.testing.assert_array_equal(w, [[1, 2, 1], [2, 1, 1], [1, 1, 2]])
    # custom weights
    w = rank_weights(dice, weights=[10, 5, 0])
    np.testing.assert_array_equal(w[:, 0], [0, 10, 5])
    with pytest.raises(ConfigError, match="rank_weights"):
        rank_weights(dice, weights=[1, 1])


def test_fuse_hand_computed_three_members():
    # 3 members, 2 classes, 2 voxels
    p = np.array(
        [
            [[0.2, 0.6], [0.8, 0.4]],
            [[0.5, 1.0], [0.5, 0.0]],
            [[1.0, 0.0], [0.0, 1.0]],
        ],
        dtype=np.float32,
    )
    w = np.array([[2, 1], [1, 1], [1, 2]], dtype=float)
    # class 0: (2*0.2 + 0.5 + 1.0)/4 = 0.475, (2*0.6 + 1.0 + 0)/4 = 0.55
    # class 1: (0.8 + 0.5 + 2*0)/4 = 0.325, (0.4 + 0 + 2*1)/4 = 0.6
    expected = np.array([[0.475, 0.55], [0.325, 0.6]], dtype=np.float32)
    out = fuse(p, w)
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # list and generator give the same; torch in -> torch out
    np.testing.assert_allclose(fuse(list(p), w), expected, atol=1e-6)
    np.testing.assert_allclose(fuse((x for x in p), w), expected, atol=1e-6)
    t = fuse(torch.from_numpy(p), w)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-6)
    # equal weights = plain mean
    np.testing.assert_allclose(fuse(p), p.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(fuse(iter(p)), p.mean(axis=0), atol=1e-6)
    with pytest.raises(ValueError):
        fuse(list(p)[:2], w)


def test_fusion_accumulator_streams_members_in_any_order():
    p = np.array([[[0.2, 0.6], [0.8, 0.4]], [[0.5, 1.0], [0.5, 0.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    w = np.array([[2, 1], [1, 1], [1, 2]], dtype=float)
    expected = np.array([[0.475, 0.55], [0.325, 0.6]], dtype=np.float32)  # hand-computed above
    acc = FusionAccumulator(w)
    for i in (2, 0, 1):  # members arrive in any order; each is added once and not kept
        labels = acc.add(i, p[i])
        np.testing.assert_array_equal(labels, p[i].argmax(0))
        assert labels.dtype == np.uint8
    np.testing.assert_allclose(acc.probs(), expected, atol=1e-6)
    np.testing.assert_array_equal(acc.labels(), [0, 1])  # 0.475 > 0.325; 0.55 < 0.6
    np.testing.assert_array_equal(acc.member_labels, p.argmax(1))  # in member index order
    # torch members: the sum stays torch, labels come back as numpy
    t = FusionAccumulator(w)
    for i in range(3):
        t.add(i, torch.from_numpy(p[i]))
    assert isinstance(t.probs(), torch.Tensor)
    np.testing.assert_allclose(t.probs().numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(t.labels(), [0, 1])


def test_fusion_accumulator_refuses_misuse():
    p = np.full((2, 3), 0.5, dtype=np.float32)
    acc = FusionAccumulator(np.ones((2, 2)))
    acc.add(0, p)
    with pytest.raises(ValueError, match="twice"):
        acc.add(0, p)
    with pytest.raises(ValueError, match="1 members but 2"):
        acc.probs()
    with pytest.raises(ValueError, match="shape"):
        acc.add(1, np.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="weight row"):
        acc.add(5, p)
    with pytest.raises(ValueError, match="no members"):
        FusionAccumulator().probs()
    assert FusionAccumulator(keep_labels=False).add(0, p) is None


def test_fusion_weights_from_the_ensemble_config():
    dice = np.array([[0.5, 0.8, np.nan], [0.7, 0.8, np.nan], [0.6, 0.3, np.nan]])
    np.testing.assert_array_equal(fusion_weights(dice, weighting="equal"), np.ones((3, 3)))
    w = fusion_weights(dice, weighting="rank")
    # classes 0, 1 ranked as in test_rank_weights_three_members_ties_and_nan; class 2 has no Dice at all:
    # nothing to rank by, so equal weights rather than favouring member 0
    np.testing.assert_array_equal(w, [[1, 2, 1], [2, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(fusion_weights(dice, weighting="rank", by_rank=[10, 5, 0])[:, 0], [0, 10, 5])
    with pytest.raises(ConfigError, match="rank_weights"):
        fusion_weights(dice, weighting="rank", by_rank=[1, 1])
    with pytest.raises(ConfigError, match="weighting"):
        fusion_weights(dice, weighting="vote")


def test_pool_weights_fuses_to_the_mean_of_the_ensembles():
    rng = np.random.default_rng(0)
    pa, pb = rng.dirichlet(np.ones(3), size=(2, 5)).transpose(0, 2, 1), rng.dirichlet(np.ones(3), size=(3, 5))
    pb = pb.transpose(0, 2, 1)  # (N, K=3, 5 voxels)
    wa, wb = rng.uniform(0.5, 3, (2, 3)), rng.uniform(0.5, 3, (3, 3))
    pooled = pool_weights([wa, wb])
    assert pooled.shape == (5, 3)
    np.testing.assert_allclose(fuse(np.concatenate([pa, pb]), pooled), (fuse(pa, wa) + fuse(pb, wb)) / 2, atol=1e-6)
    np.testing.assert_array_equal(pool_weights([wa]), wa)  # one ensemble: its weights unchanged


def _stack_for_partitions():
    """(6, P) label stack where column j realises one partition of 6 voters."""
    parts = [(6,), (5, 1), (4, 2), (3, 3), (4, 1, 1), (3, 2, 1), (2, 2, 2), (3, 1, 1, 1)]
    cols = []
    for part in parts:
        col = []
        for label, count in enumerate(part):
            col += [label * 3 + 1] * count  # arbitrary label values, up to 22
        cols.append(col)
    return np.array(cols, dtype=np.uint8).T


def test_vote_entropy_six_voter_levels():
    labels = _stack_for_partitions()
    rng = np.random.default_rng(0)
    labels = rng.permuted(labels, axis=0)  # voter order must not matter
    h = vote_entropy(labels)
    assert h.dtype == np.float32 and h.shape == (8,)
    np.testing.assert_allclose(h, SIX_VOTER_LEVELS, atol=1e-4)
    # independent truth: scipy-free direct formula on one column
    col = labels[:, 5]
    _, c = np.unique(col, return_counts=True)
    f = c / 6
    assert abs(h[5] - (-(f * np.log(f)).sum())) < 1e-6
    # 3D shape, chunking and torch give the same
    vol = labels.reshape(6, 2, 2, 2)
    np.testing.assert_allclose(vote_entropy(vol, chunk=3).ravel(), h, atol=1e-7)
    ht = vote_entropy(torch.from_numpy(vol))
    assert isinstance(ht, torch.Tensor)
    np.testing.assert_allclose(ht.numpy().ravel(), h, atol=1e-7)


def test_vote_entropy_matches_onehot_counting_random():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 23, size=(6, 5, 7, 9), dtype=np.uint8)
    counts = np.stack([(labels == k).sum(0) for k in range(23)])  # one-hot counting
    f = counts / 6
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = -np.where(f > 0, f * np.log(f), 0).sum(0)
    np.testing.assert_allclose(vote_entropy(labels), expected, atol=1e-6)


def test_entropy_levels_and_quantise():
    lv = entropy_levels(6)
    np.testing.assert_allclose(lv[:8], SIX_VOTER_LEVELS, atol=1e-4)
    assert len(lv) == 11  # p(6) = 11 partitions, all distinct
    assert abs(lv[-1] - math.log(6)) < 1e-12
    assert len(entropy_levels(6, max_classes=2)) == 4  # 6, 5:1, 4:2, 3:3
    np.testing.assert_allclose(entropy_levels(2), [0, math.log(2)])
    h = vote_entropy(_stack_for_partitions())
    np.testing.assert_array_equal(quantise_levels(h, 6), np.arange(8))
    np.testing.assert_array_equal(quantise_levels(np.float32(0.45061), 6), 1)
    with pytest.raises(ValueError, match="not a level"):
        quantise_levels(np.array([0.3]), 6)


def test_vvc_known_volumes():
    # organ 0: volumes 1, 2, 3 -> mu 2, population sigma sqrt(2/3) -> 0.408248
    # organ 1: constant -> 0; organ 2: all zero -> NaN
    v = np.array([[1.0, 5.0, 0.0], [2.0, 5.0, 0.0], [3.0, 5.0, 0.0]])
    out = vvc(v)
    np.testing.assert_allclose(out[:2], [math.sqrt(2 / 3) / 2, 0.0])
    assert np.isnan(out[2])


def test_member_volumes_cm3():
    lab = np.zeros((2, 4, 5, 5), dtype=np.uint8)
    lab[0, :2, :2, :2] = 1  # 8 voxels
    lab[1, :, :, :] = 3  # 100 voxels
    lab[1, 0, 0, 0] = 1
    vol = member_volumes(lab, spacing_zyx=(3.0, 1.0, 0.5), organs=(1, 2, 3))
    # voxel = 1.5 mm3 = 0.0015 cm3
    np.testing.assert_allclose(vol, [[8 * 0.0015, 0, 0], [0.0015, 0, 99 * 0.0015]])
