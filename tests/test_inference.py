"""Sliding-window inference: exact reconstruction with known predictors, Gaussian weights, TTA, window starts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sepnet.core.inference import (
    STRUCTSEG_LR_PAIRS,
    autocast_dtype,
    gaussian_importance,
    reference_windows,
    sliding_window,
    window_starts,
)

PATCH = (4, 6, 6)


def identity(batch: torch.Tensor) -> torch.Tensor:
    """Logits = the input channels: a voxel's answer depends only on its own value, wherever the window is."""
    return batch.clone()


def onehot_volume(shape, k, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=shape)
    vol = np.zeros((k, *shape), np.float32)
    for c in range(k):
        vol[c][labels == c] = rng.uniform(2.0, 6.0)  # class-dependent logit margins
    return labels, vol


# ----------------------------------------------------------------------------------------- windows


def test_window_starts_hand_and_coverage():
    # size 13, patch 6, overlap 0.5: step 3 -> ceil(7 / 3) + 1 = 4 windows, spaced 7/3 -> 0, 2, 5, 7
    assert window_starts(13, 6, 0.5) == [0, 2, 5, 7]
    assert window_starts(6, 6, 0.5) == [0]
    assert window_starts(12, 6, 0.0) == [0, 6]
    rng = np.random.default_rng(0)
    for _ in range(200):
        patch = int(rng.integers(1, 40))
        size = patch + int(rng.integers(0, 200))
        overlap = float(rng.uniform(0, 0.9))
        s = window_starts(size, patch, overlap)
        assert s[0] == 0 and s[-1] == size - patch
        if patch * (1 - overlap) >= 1:  # else rounding repeats starts, which are dropped
            assert len(s) == math.ceil((size - patch) / (patch * (1 - overlap))) + 1
        assert all(0 < b - a <= patch for a, b in zip(s, s[1:]))  # increasing, no gap: every voxel covered
    with pytest.raises(ValueError, match="pad"):
        window_starts(5, 6, 0.5)


# ----------------------------------------------------------------------------------------- gaussian


def test_gaussian_importance_centre_and_sigma():
    patch = (9, 17, 13)
    scale = 0.125
    w = gaussian_importance(patch, sigma_scale=scale)
    assert w.dtype == np.float32 and w.shape == patch
    c = (4, 8, 6)
    assert w[c] == 1.0 and np.unravel_index(np.argmax(w), patch) == c
    for ax, p in enumerate(patch):
        sigma = p * scale
        idx = list(c)
        for d in range(-c[ax], p - c[ax]):
            idx[ax] = c[ax] + d
            assert w[tuple(idx)] == pytest.approx(math.exp(-(d**2) / (2 * sigma**2)), rel=1e-6)
    # separable: a corner is the product of the axis profiles
    corner = math.prod(math.exp(-(((p - 1) / 2) ** 2) / (2 * (p * scale) ** 2)) for p in patch)
    assert w[0, 0, 0] == pytest.approx(corner, rel=1e-5)
    # even patch: mirror-symmetric, peak shared by the two middle voxels
    we = gaussian_importance((4, 6, 8))
    for ax in range(3):
        np.testing.assert_array_equal(we, np.flip(we, ax))
    assert we[1, 2, 3] == we.max() == we[2, 3, 4]
    assert (gaussian_importance((16, 16, 16), sigma_scale=0.01) > 0).all()  # underflow replaced


# ----------------------------------------------------------------------------------------- sliding window


def test_constant_logits_give_their_softmax_everywhere():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0])

    def const(batch):
        return logits.view(1, -1, 1, 1, 1).expand(batch.shape[0], -1, *batch.shape[2:]).clone()

    vol = np.zeros((1, 9, 13, 11), np.float32)
    out = sliding_window(vol, const, num_classes=4, patch=PATCH, overlap=0.5, batch_size=3)
    assert out.shape == (4, 9, 13, 11) and out.dtype == torch.float32
    expected = torch.softmax(logits, 0).view(-1, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(9, 13, 7), (3, 5, 4), (4, 6, 6), (2, 17, 5)])
def test_per_voxel_answer_reconstructed_with_padding(shape):
    # (9, 13, 7): not divisible by the patch; (3, 5, 4): smaller than it on every axis; (2, 17, 5): mixed
    k = 3
    labels, vol = onehot_volume(shape, k, seed=sum(shape))
    out = sliding_window(torch.from_numpy(vol), identity, num_classes=k, patch=PATCH, overlap=0.5)
    assert out.shape == (k, *shape)
    torch.testing.assert_close(out, torch.softmax(torch.from_numpy(vol), 0), atol=1e-6, rtol=0)
    assert np.array_equal(out.argmax(0).numpy(), labels)


def test_batch_size_and_overlap_do_not_change_an_exact_answer():
    labels, vol = onehot_volume((7, 10, 9), 3, seed=5)
    a = sliding_window(vol, identity, num_classes=3, patch=PATCH, batch_size=1, overlap=0.25)
    b = sliding_window(vol, identity, num_classes=3, patch=PATCH, batch_size=5, overlap=0.75)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_windows_are_gaussian_weighted():
    # predictor answering class 1 in the first window and class 0 in the second: where windows overlap,
    # the output is the first window's Gaussian share, hand-computed from the two windows' weights.
    def first_window_class1(batch):
        out = torch.zeros(batch.shape[0], 2, *batch.shape[2:])
        out[0, 1] = 50.0  # softmax ~ one-hot class 1 in the first window (both windows are one batch)
        out[1:, 0] = 50.0  # ~ one-hot class 0 elsewhere
        return out

    # x size 9 with patch 6: windows start at 0 and 3 along x only
    out = sliding_window(
        np.zeros((1, 4, 6, 9), np.float32), first_window_class1, num_classes=2, patch=PATCH, batch_size=2
    )
    g = gaussian_importance(PATCH)
    # at x = 5: first window's local x 5 (2.5 voxels off centre), second window's local x 2 (0.5 off)
    w1, w2 = g[0, 0, 5], g[0, 0, 2]
    assert w1 < w2
    assert out[1, 0, 0, 5].item() == pytest.approx(w1 / (w1 + w2), abs=1e-6)
    assert out[1, 2, 3, 4].item() == pytest.approx(0.5, abs=1e-6)  # x = 4: local 4 and 1, equal weights
    assert out[1, 0, 0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert out[1, 0, 0, 7].item() == pytest.approx(0.0, abs=1e-6)


def test_tta_with_flip_equivariant_predictor_is_unchanged():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 2, generator=gen)

    def pointwise(batch):  # a 1x1x1 convolution commutes with every flip
        return torch.einsum("kc,bczyx->bkzyx", weight, batch)

    vol = torch.rand((2, 7, 11, 10), generator=gen)
    plain = sliding_window(vol, pointwise, num_classes=4, patch=PATCH)
    for tta in (True, ("z", "y", "x"), (0,)):
        torch.testing.assert_close(sliding_window(vol, pointwise, num_classes=4, patch=PATCH, tta=tta), plain)


def test_tta_x_flip_swaps_left_right_classes():
    # a "lateralised" predictor: class 1 where intensity rises along +x, class 2 where it falls. On an
    # x-ramp it answers 1; on the mirrored input it answers 2, which is 1 again only after the L/R swap.
    def gradient_sign(batch):
        g = batch[:, :1, :, :, 1:] - batch[:, :1, :, :, :-1]
        g = torch.cat([g, g[..., -1:]], dim=-1).sign() * 10
        return torch.cat([torch.zeros_like(g), g, -g], dim=1)

    vol = torch.arange(11, dtype=torch.float32).expand(1, 5, 8, 11).clone()
    plain = sliding_window(vol, gradient_sign, num_classes=3, patch=PATCH)
    assert (plain.argmax(0) == 1).all()
    swapped = sliding_window(vol, gradient_sign, num_classes=3, patch=PATCH, tta=("x",), lr_pairs=[(1, 2)])
    torch.testing.assert_close(swapped, plain)
    unswapped = sliding_window(vol, gradient_sign, num_classes=3, patch=PATCH, tta=("x",), lr_pairs=None)
    assert torch.allclose(unswapped[1], unswapped[2], atol=1e-6)  # mixed up without the swap
    assert (2, 3) in STRUCTSEG_LR_PAIRS and (21, 22) in STRUCTSEG_LR_PAIRS and len(STRUCTSEG_LR_PAIRS) == 9


def test_bad_predictor_shape_and_volume_rank():
    with pytest.raises(ValueError, match="predictor returned shape"):
        sliding_window(np.zeros((1, 4, 6, 6), np.float32), lambda b: b[:, :, :2], num_classes=1, patch=PATCH)
    with pytest.raises(ValueError, match=r"\(C, Z, Y, X\)"):
        sliding_window(np.zeros((4, 6, 6), np.float32), identity, num_classes=1, patch=PATCH)


# ----------------------------------------------------------------------------------------- reference scheme


def test_reference_windows_per_voxel_and_coverage():
    k = 3
    labels, vol = onehot_volume((21, 8, 8), k, seed=3)
    calls = []

    def spy(batch):
        calls.append(batch.shape)
        return identity(batch)

    out = reference_windows(vol, spy, num_classes=k, depth=16, stride=2)
    torch.testing.assert_close(out, torch.softmax(torch.from_numpy(vol), 0), atol=1e-6, rtol=0)
    assert len(calls) == 4  # starts 0, 2, 4 and the flush 5
    assert all(tuple(s) == (1, k, 16, 8, 8) for s in calls)
    thin_labels, thin = onehot_volume((5, 8, 8), k, seed=4)  # thinner than a window: padded in z
    out = reference_windows(thin, identity, num_classes=k)
    assert out.shape == (k, 5, 8, 8) and np.array_equal(out.argmax(0).numpy(), thin_labels)


# ----------------------------------------------------------------------------------------- autocast

def test_autocast_dtype_per_device(monkeypatch):
    assert autocast_dtype("cpu") is None and autocast_dtype(torch.device("cpu")) is None
    # no CUDA device at hand: stand in for torch.cuda to check the rule (bf16 from compute capability 8.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caps = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: caps[torch.device(d).index or 0])
    assert autocast_dtype("cuda") is torch.bfloat16
    assert autocast_dtype("cuda:1") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert autocast_dtype("cuda") is None


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cpu_bf16_auto_follows_the_cpus_bf16_instructions(monkeypatch, has_bf16):
    import sepnet.core.inference as inference

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert inference.cpu_has_bf16() is has_bf16
    assert autocast_dtype("cpu", cpu_bf16="auto") is (torch.bfloat16 if has_bf16 else None)
    assert autocast_dtype("cpu", cpu_bf16=True) is torch.bfloat16  # explicit settings win
    assert autocast_dtype("cpu", cpu_bf16=False) is None
