"""Whole-volume inference by sliding windows (docs/conventions.md).

:func:`sliding_window` is the nnU-Net/MONAI scheme: patch-sized windows overlapping by ``overlap``, the
softmax of each window weighted by a Gaussian importance map (sigma = patch / 8) and the weighted sum
normalised by the summed weights, optionally averaged over flipped copies (test-time augmentation).
:func:`reference_windows` is the scheme of the paper's public code: 16-slice windows over the full
in-plane extent, z-stride 2, softmax summed; it exists for comparison. :func:`autocast_dtype` is the one
choice of mixed-precision dtype for a device (training, validation, evaluation and predict).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch

from sepnet.core.organs import NUM_CLASSES, STRUCTSEG22

Predictor = Callable[[torch.Tensor], torch.Tensor]

AXES = {"z": 0, "y": 1, "x": 2}

# StructSeg left/right class pairs (Eye_L/Eye_R, ...): an x-flipped head shows the patient's right organ
# where the left one was, so the prediction of a flipped input must swap these channels when flipped back.
STRUCTSEG_LR_PAIRS: tuple[tuple[int, int], ...] = STRUCTSEG22.lr_pairs


def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 instructions (avx512_bf16 or AMX), where oneDNN runs bf16 natively;
    elsewhere bf16 is emulated and slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(device: str | torch.device, *, cuda: bool = True,
                   cpu_bf16: bool | str = False) -> torch.dtype | None:
    """The autocast dtype for ``device``: on CUDA (when ``cuda``) bfloat16 where the device supports it
    natively (compute capability >= 8.0), else float16; on the CPU bfloat16 when ``cpu_bf16`` is true, or
    is ``"auto"`` and :func:`cpu_has_bf16`; None (no autocast, float32) otherwise."""
    device = torch.device(device)
    if device.type == "cpu":
        on = cpu_has_bf16() if cpu_bf16 == "auto" else bool(cpu_bf16)
        return torch.bfloat16 if on else None
    if device.type != "cuda" or not cuda or not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast(device: str | torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context when ``dtype`` is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


def gaussian_importance(patch: Sequence[int], *, sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian importance map of one window, float32 of shape ``patch`` (z, y, x), maximum 1.

    value(i) = prod_axis exp(-(i - c)^2 / (2 sigma^2)) with c = (p - 1) / 2 and sigma = p * sigma_scale
    (voxels). nnU-Net builds the same map by Gaussian-filtering a delta at p // 2; the centre (p - 1) / 2
    used here makes the map exactly mirror-symmetric, so flip TTA stays exactly equivariant. Zeros (underflow
    for tiny sigma_scale) are replaced by the smallest nonzero value so every voxel keeps some weight.
    """
    patch = tuple(int(p) for p in patch)
    if any(p < 1 for p in patch) or not sigma_scale > 0:
        raise ValueError(f"gaussian_importance: patch {patch} must be positive and sigma_scale {sigma_scale} > 0")
    w = np.ones((), dtype=np.float64)
    for p in patch:
        i = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        sigma = p * sigma_scale
        w = np.multiply.outer(w, np.exp(-(i**2) / (2.0 * sigma**2)))
    w = (w / w.max()).astype(np.float32)
    zero = w == 0
    if zero.any():
        w[zero] = w[~zero].min()
    return w


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (nnU-Net's rule).

    steps = ceil((size - patch) / (patch * (1 - overlap))) + 1, evenly spaced (rounded), the first at 0 and
    the last flush with the end (size - patch), duplicates dropped. ``size`` must be >= ``patch`` (pad first).
    """
    if size < patch:
        raise ValueError(f"window_starts: size {size} < patch {patch}; pad the volume first")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    step = patch * (1.0 - overlap)
    n = int(math.ceil((size - patch) / step)) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    # dedupe: with patch * (1 - overlap) < 1 voxel, rounding repeats starts (a repeat changes nothing but time)
    return sorted({int(round(actual * i)) for i in range(n)})


def _as_tensor(volume) -> torch.Tensor:
    if isinstance(volume, torch.Tensor):
        t = volume
    else:  # a copy when needed (read-only zarr/memmap arrays, float16): torch warns on non-writable memory
        arr = np.asarray(volume)
        t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=not arr.flags.writeable or None))
    if t.ndim != 4:
        raise ValueError(f"volume must be (C, Z, Y, X), got shape {tuple(t.shape)}")
    return t.to(dtype=torch.float32)


def _pad_to(t: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad (C, Z, Y, X) to at least ``patch`` spatially, centred; return the crop that undoes it.

    0 is the bottom of the [0, 1] intensity range (air) for the SLF/NLF inputs.
    """
    pads = []
    crop = []
    for size, p in zip(t.shape[1:], patch):
        total = max(p - size, 0)
        lo = total // 2
        pads.append((lo, total - lo))
        crop.append(slice(lo, lo + size))
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]  # F.pad wants the last axis first
        t = torch.nn.functional.pad(t, flat)
    return t, (slice(None), *crop)


def _flip_sets(tta) -> list[tuple[int, ...]]:
    """Flip combinations (spatial axes 0..2 of (Z, Y, X)) to average, identity first."""
    if tta is False or tta is None:
        return [()]
    axes = ("y", "x") if tta is True else tuple(tta)
    dims = sorted({AXES[a] if isinstance(a, str) else int(a) for a in axes})
    if any(d not in (0, 1, 2) for d in dims):
        raise ValueError(f"tta axes must be among z, y, x (0, 1, 2), got {tta}")
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


def _swap_index(num_classes: int, lr_pairs) -> torch.Tensor | None:
    if lr_pairs == "auto":
        lr_pairs = STRUCTSEG_LR_PAIRS if num_classes == NUM_CLASSES else ()
    if not lr_pairs:
        return None
    idx = list(range(num_classes))
    for a, b in lr_pairs:
        if not (0 <= a < num_classes and 0 <= b < num_classes):
            raise ValueError(f"lr_pairs: class pair ({a}, {b}) outside 0..{num_classes - 1}")
        idx[a], idx[b] = b, a
    return torch.tensor(idx)


@torch.inference_mode()
def sliding_window(
    volume,
    predictor: Predictor,
    *,
    num_classes: int,
    patch: Sequence[int],
    overlap: float = 0.5,
    sigma_scale: float = 0.125,
    batch_size: int = 2,
    tta: bool | Sequence[str | int] = False,
    lr_pairs: Sequence[tuple[int, int]] | str | None = "auto",
    device: str | torch.device = "cpu",
    accumulate_device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Gaussian-weighted sliding-window class probabilities of a whole volume.

    Args:
        volume: (C, Z, Y, X) numpy array or tensor (transformed intensities, float; cast to float32).
        predictor: called as ``predictor(batch)`` with batch (B, C, z, y, x) float32 on ``device`` under
            ``torch.inference_mode()``; returns logits (B, num_classes, z, y, x). Put the model in eval mode.
        num_classes: K, including background.
        patch: window size (z, y, x) in voxels. Volumes smaller than the patch along an axis are zero-padded
            (centred) for inference and cropped back.
        overlap: fraction of the patch shared by neighbouring windows, in [0, 1); window starts follow
            :func:`window_starts` (the last window is flush with the end).
        sigma_scale: Gaussian sigma as a fraction of the patch (1/8 as nnU-Net and MONAI).
        batch_size: windows per predictor call.
        tta: False; True = mirror over y and x (4 passes); or a sequence of axes ("z", "y", "x" or 0..2):
            every flip combination of them is predicted, flipped back and the probabilities averaged.
        lr_pairs: class pairs whose channels are swapped after an x flip (a mirrored head shows the right
            organ on the left). "auto" = the StructSeg pairs when num_classes == 23, else none; None = none.
        device: where the predictor runs.
        accumulate_device: where the (K, Z, Y, X) float32 sum lives (memory: 4 K Z Y X bytes plus Z Y X for
            the weights, 0.7 GB for 23 x 120 x 256 x 256); None = ``device``. Use "cpu" to save GPU memory.
        progress: show a tqdm bar over windows.

    Returns:
        float32 CPU tensor (K, Z, Y, X) of probabilities (they sum to 1 over K at every voxel).
    """
    vol = _as_tensor(volume)
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3:
        raise ValueError(f"patch must be (z, y, x), got {patch}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    acc_device = device if accumulate_device is None else torch.device(accumulate_device)
    padded, crop = _pad_to(vol, patch)
    shape = tuple(padded.shape[1:])
    starts = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(shape, patch))))
    flips = _flip_sets(tta)
    swap = _swap_index(num_classes, lr_pairs)
    gauss = torch.from_numpy(gaussian_importance(patch, sigma_scale=sigma_scale)).to(acc_device)

    probs = torch.zeros((num_classes, *shape), dtype=torch.float32, device=acc_device)
    weight = torch.zeros(shape, dtype=torch.float32, device=acc_device)
    for s in starts:  # weights do not depend on the predictions: sum them once
        weight[s[0] : s[0] + patch[0], s[1] : s[1] + patch[1], s[2] : s[2] + patch[2]] += gauss

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), desc="sliding window", unit="win")
    for b0 in range(0, len(starts), batch_size):
        group = starts[b0 : b0 + batch_size]
        batch = torch.stack([padded[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in group]).to(
            device
        )
        p = torch.zeros((len(group), num_classes, *patch), dtype=torch.float32, device=device)
        for f in flips:
            dims = tuple(d + 2 for d in f)
            inp = torch.flip(batch, dims) if f else batch
            logits = predictor(inp)
            if tuple(logits.shape) != (len(group), num_classes, *patch):
                raise ValueError(
                    f"predictor returned shape {tuple(logits.shape)}, expected {(len(group), num_classes, *patch)}"
                )
            sm = torch.softmax(logits.float(), dim=1)
            if f:
                sm = torch.flip(sm, dims)
                if 2 in f and swap is not None:
                    sm = sm[:, swap.to(sm.device)]
            p += sm
        if len(flips) > 1:
            p /= len(flips)
        p = p.to(acc_device) * gauss
        for (z, y, x), pw in zip(group, p):
            probs[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]] += pw
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    probs /= weight
    return probs[crop].cpu().contiguous()


@torch.inference_mode()
def reference_windows(
    volume,
    predictor: Predictor,
    *,
    num_classes: int,
    depth: int = 16,
    stride: int = 2,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The reference code's inference: windows of ``depth`` slices over the full in-plane extent, z-stride
    ``stride``, softmax summed (no weighting, no overlap rule beyond the stride).

    Windows start at 0, stride, 2 stride, ... while they fit, plus one flush with the last slice if the
    stride skipped it; a volume thinner than ``depth`` is zero-padded in z. The summed softmax is divided by
    the number of windows covering each slice, which leaves the argmax unchanged and makes the output
    probabilities. The in-plane size must suit the network (e.g. divisible by 8).

    Returns:
        float32 CPU tensor (K, Z, Y, X).
    """
    vol = _as_tensor(volume)
    if depth < 1 or stride < 1:
        raise ValueError(f"depth {depth} and stride {stride} must be >= 1")
    z_size, y_size, x_size = vol.shape[1:]
    padded, crop = _pad_to(vol, (depth, y_size, x_size))
    nz = padded.shape[1]
    starts = list(range(0, nz - depth + 1, stride))
    if starts[-1] != nz - depth:
        starts.append(nz - depth)
    device = torch.device(device)
    acc = torch.zeros((num_classes, nz, y_size, x_size), dtype=torch.float32)
    count = torch.zeros((nz, 1, 1), dtype=torch.float32)
    for z in starts:
        logits = predictor(padded[None, :, z : z + depth].to(device))
        if tuple(logits.shape) != (1, num_classes, depth, y_size, x_size):
            raise ValueError(
                f"predictor returned shape {tuple(logits.shape)}, expected {(1, num_classes, depth, y_size, x_size)}"
            )
        acc[:, z : z + depth] += torch.softmax(logits.float(), dim=1)[0].cpu()
        count[z : z + depth] += 1
    acc /= count
    return acc[crop].contiguous()
