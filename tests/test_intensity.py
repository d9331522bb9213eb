from __future__ import annotations

import numpy as np
import pytest
import torch

from sepnet.core.intensity import PRESETS, TRANSFORMS, apply_transform, slf

# Hand-computed: x_i + (x_{i+1} - x_i) * (h - h_i) / (h_{i+1} - h_i), clamped at both ends.
CASES = {
    "SLF1": {
        -2000: 0.0,
        -500: 0.0,
        -350: 0.1,
        -200: 0.2,
        0: 0.5,
        200: 0.8,
        850: 0.9,
        1500: 1.0,
        2000: 1.0,
    },
    "SLF2": {-600: 0.0, -500: 0.0, -300: 0.1, -100: 0.2, 0: 0.5, 50: 0.65, 100: 0.8, 800: 0.9, 3000: 1.0},
    "SLF3": {-1024: 0.0, -300: 0.1, -100: 0.2, 150: 0.5, 400: 0.8, 950: 0.9, 1500: 1.0, 1600: 1.0},
    "NLF1": {-1000: 0.0, -100: 0.0, 0: 0.5, 50: 0.75, 100: 1.0, 200: 1.0},
    "NLF2": {-1000: 0.0, -500: 0.0, -175: 0.25, 150: 0.5, 800: 1.0, 1000: 1.0},
    "REF": {-1000: 0.0, -300: 0.05, -100: 0.1, 150: 0.45, 400: 0.8, 950: 0.9, 2000: 1.0},
}


def test_preset_names():
    assert set(TRANSFORMS) == {"SLF1", "SLF2", "SLF3", "NLF1", "NLF2", "REF"}
    assert set(PRESETS) == set(TRANSFORMS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_presets_hand_computed(name):
    hu = np.array(list(CASES[name]), dtype=np.int16)
    expected = np.array(list(CASES[name].values()), dtype=np.float64)
    out = apply_transform(hu, name)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == hu.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)
    out_t = apply_transform(torch.from_numpy(hu), name)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_numpy_equals_torch_on_random_volume(name):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3000, size=(3, 17, 19)).astype(np.int16)
    a = apply_transform(hu, name)
    b = apply_transform(torch.from_numpy(hu), name).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.min() >= 0.0 and a.max() <= 1.0
    # monotone non-decreasing in HU
    order = np.argsort(hu.ravel(), kind="stable")
    assert np.all(np.diff(a.ravel()[order]) >= -1e-7)


def test_general_piecewise_and_float_input():
    out = slf(np.array([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 5.0]), [0.0, 1.0, 2.0], [0.3, 0.9, 0.1])
    np.testing.assert_allclose(out, [0.3, 0.3, 0.6, 0.9, 0.5, 0.1, 0.1], atol=1e-6)


@pytest.mark.parametrize(
    "h, v, msg",
    [
        ([0, 0, 1], [0, 0.5, 1], "strictly increasing"),
        ([0, 2, 1], [0, 0.5, 1], "strictly increasing"),
        ([0, 1, 2], [0, 1], "lengths"),
        ([0], [0], "at least 2"),
        ([0, 1], [0, 1.5], r"\[0, 1\]"),
        ([0, 1], [-0.1, 1], r"\[0, 1\]"),
    ],
)
def test_bad_breakpoints(h, v, msg):
    with pytest.raises(ValueError, match=msg):
        slf(np.zeros(3), h, v)
    with pytest.raises(ValueError, match=msg):
        slf(torch.zeros(3), h, v)


def test_nan_input():
    with pytest.raises(ValueError, match="NaN"):
        slf(np.array([0.0, np.nan]), [0, 1], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        slf(torch.tensor([0.0, float("nan")]), [0, 1], [0, 1])


def test_unknown_transform():
    with pytest.raises(ValueError, match="SLF1"):
        apply_transform(np.zeros(2), "SLF9")
