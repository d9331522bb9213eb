"""3D-SepNet and the 3D U-Net baselines (paper Sec. 3.2, docs/conventions.md).

All networks take ``x`` of shape (B, in_channels, Z, Y, X) float32 with Z, Y, X divisible by 8 (three
MaxPool3d(2) levels halve z too) and return logits (B, num_classes, Z, Y, X).

Topologies (b = ``base``; IN = non-affine InstanceNorm3d; all convs have bias):

* ``sepnet``: Block(cin -> cout) = [1x3x3 -> IN -> ReLU] -> [3x1x1 -> IN -> ReLU] -> [1x3x3 -> IN -> ReLU]
  -> [1x3x3 -> IN -> ReLU], plus a 1x1x1 conv of the block input added to that output, then IN -> ReLU.
  Encoder 1->2b | pool | 2b->2b | pool | 2b->4b | pool | bottleneck 4b->8b, 8b->4b, then one Dropout(0.5)
  (the reference code's ``conv5 -> dropout``); decoder (trilinear x2 upsampling, concat skip):
  8b->4b->2b | 4b->2b->2b | 4b->2b->2b;
  head Dropout3d(0.1) -> 1x1x1 conv. b=24, 1 -> 23 classes: **2,505,527** parameters.
* ``sepnet_se``: ``sepnet`` with squeeze-excitation (GAP -> FC C->C/2 -> ReLU -> FC C/2->C -> sigmoid,
  FCs without bias) on the output of every block: **2,586,167** (the count in docs/conventions.md; SE FCs
  with bias would give 2,587,391, so the reference's "SepNet-SE" has bias-free FCs).
* ``unet3d``: per level two [3x3x3 -> IN -> ReLU] units: 1->b->2b | 2b->2b->4b | 4b->4b->8b |
  bottleneck 8b->8b->16b, then one Dropout(0.5) (as the reference U-Net); decoder (upsample, concat skip)
  24b->8b->8b | 12b->4b->4b | 6b->2b->2b; same head: **9,179,207**. The paper's "48 base channels" for
  the baselines is b = 24 here (first level 2b = 48 wide); b = 48 gives 36.7 M parameters.
* ``unet3d_res``: each unit becomes ReLU(IN(conv3x3x3(x) + conv1x1x1(x))): **9,520,823**.
* ``unet3d_se``: ``unet3d`` with the same bias-free SE after each level's pair of units (7 blocks):
  **9,423,431**.

``separable_axis`` ("z" default, "y", "x") chooses which axis gets SepNet's 1-D (inter-slice) conv; the
other two get the 3x3 (intra-slice) conv, e.g. "z": 1x3x3 and 3x1x1; "y": 3x1x3 and 1x3x1.

Speed: :class:`AxisConv3d` is an ``nn.Conv3d`` (same ``weight``/``bias`` shapes and ``state_dict`` keys,
so checkpoints are interchangeable with a plain-Conv3d model) whose forward, when ``fast`` is true, runs
1x3x3 kernels as a ``conv2d`` on a (B*Z, C, Y, X) view and 1x1x1 kernels as a 1x1 ``conv2d`` on a
(B, C, Z, Y*X) view; 3x1x1 kernels use oneDNN's channels-last conv3d (faster than the (3, 1) conv2d view
in a micro-benchmark). SepNet runs in ``channels_last_3d`` memory format, where these reshapes are free
views, and its instance norm uses ``F.group_norm`` (one group per channel: same statistic, keeps the
layout). ``set_fast(model, False)`` switches to the reference ``F.conv3d`` path, ``set_channels_last``
chooses the memory format, ``to_plain_conv3d(model)`` returns a copy built from plain ``nn.Conv3d``.
Measured later on a quieter machine (1 thread, batch 2, 16x64x64, forward+backward+Adam): at base 8
plain conv3d 0.74 s, the conv2d views in the default layout 1.20 s, channels-last 1.76 s; at base 24
3.75 s, 3.55 s and 5.66 s. So ``build`` defaults to ``fast=False`` (plain oneDNN conv3d, the fastest or
within noise at every size measured) and SepNet's fast path runs in the default memory format; both
fast variants stay available (``fast=True``, ``set_channels_last``) for other machines (see
docs/benchmarks.md). SepNet stays ~0.9x the 3D-UNet step, not the 0.51x its FLOPs suggest: at full
resolution it runs 15 convs + 15 norms per block stack against the 3D-UNet's 4, which are memory-bound.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

NETWORKS: tuple[str, ...] = ("sepnet", "sepnet_se", "unet3d", "unet3d_res", "unet3d_se")
_AXES = {"z": 2, "y": 3, "x": 4}


class AxisConv3d(nn.Conv3d):
    """A stride-1, 'same'-padded Conv3d whose kernel is 1 along some axes (1x3x3, 3x1x1, 1x1x1, ...).

    Stored exactly like ``nn.Conv3d``; with ``fast=True`` the forward uses ``conv2d`` on a view:
    a kernel 3 along two axes -> 2-D conv over those axes with the third folded into the batch; a kernel
    3 along one axis -> (3, 1) conv with the other two axes flattened. Full 3x3x3 kernels use conv3d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int], *, fast: bool = True):
        padding = tuple(k // 2 for k in kernel_size)
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=True)
        self.fast = fast
        self.channels_last = False  # set by networks that run in channels_last_3d (fast path only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast and not self._bf16_cpu_short_axis(x):
            return super().forward(x)
        out = self._fast_forward(x)
        if self.channels_last:
            # no-op when already channels-last; needed after a 1-channel input, whose layout is ambiguous
            out = out.contiguous(memory_format=torch.channels_last_3d)
        return out

    def _bf16_cpu_short_axis(self, x: torch.Tensor) -> bool:
        """True under CPU bf16 autocast for a 1-D kernel along an axis shorter than the kernel (a SepNet
        bottleneck at z = 2): oneDNN's bf16 conv3d weight gradient is NaN there (torch 2.13), the conv2d
        view is not, so those convs take the view."""
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return False
        k = tuple(self.kernel_size)
        return sum(v > 1 for v in k) == 1 and any(v > 1 and n < v for v, n in zip(k, x.shape[2:]))

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        k = tuple(self.kernel_size)
        if k == (3, 3, 3):
            return super().forward(x)
        b, c = x.shape[:2]
        cout = self.out_channels
        w = self.weight
        big = [d for d in range(3) if k[d] > 1]
        if not big:  # 1x1x1: a 2-D 1x1 conv on (B, C, Z, Y*X) is a free view in either memory format
            z, y, xx = x.shape[2:]
            out = F.conv2d(x.reshape(b, c, z, y * xx), w.reshape(cout, c, 1, 1), self.bias)
            return out.reshape(b, cout, z, y, xx)
        if len(big) == 1:
            if x.is_contiguous(memory_format=torch.channels_last_3d) and not self._bf16_cpu_short_axis(x):
                # oneDNN's channels-last conv3d handles 3x1x1 faster than the (3, 1) conv2d view (measured)
                return super().forward(x)
            d = big[0] + 2  # tensor dim of the 1-D kernel
            xt = x if d == 2 else x.movedim(d, 2)
            n, m1, m2 = xt.shape[2:]
            out = F.conv2d(
                xt.reshape(b, c, n, m1 * m2), w.reshape(cout, c, k[d - 2], 1), self.bias, padding=(k[d - 2] // 2, 0)
            )
            out = out.reshape(b, cout, n, m1, m2)
            return out if d == 2 else out.movedim(2, d)
        # two axes with a kernel: fold the remaining axis into the batch
        d = [i for i in range(3) if k[i] == 1][0] + 2
        xt = x.movedim(d, 1)  # (B, D, C, P, Q)
        dd, _, p, q = xt.shape[1:]
        w2 = w.reshape(cout, c, *[k[i] for i in range(3) if i + 2 != d])
        out = F.conv2d(xt.reshape(b * dd, c, p, q), w2, self.bias, padding=tuple(s // 2 for s in w2.shape[2:]))
        return out.reshape(b, dd, cout, p, q).movedim(1, d)


def _kernels(axis: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(intra-slice 2-D kernel, inter-slice 1-D kernel) for the chosen separable axis."""
    if axis not in _AXES:
        raise ValueError(f"separable_axis must be one of {tuple(_AXES)}, got {axis!r}")
    i = _AXES[axis] - 2
    k2 = tuple(1 if j == i else 3 for j in range(3))
    k1 = tuple(3 if j == i else 1 for j in range(3))
    return k2, k1  # type: ignore[return-value]


class InstanceNorm(nn.InstanceNorm3d):
    """Non-affine InstanceNorm3d (no parameters, no buffers) whose forward uses ``F.group_norm`` with one
    group per channel: the same statistic (eps 1e-5, biased variance), but the CPU kernel keeps
    ``channels_last_3d`` and is faster than ``instance_norm`` (which reshapes to (1, B*C, ...) and copies)."""

    def __init__(self, num_features: int):
        super().__init__(num_features, affine=False, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_features, eps=self.eps)


def _norm(c: int) -> nn.Module:
    return InstanceNorm(c)


class SqueezeExcite(nn.Module):
    """GAP -> FC C->C/2 -> ReLU -> FC C/2->C -> sigmoid, scaling the channels (bias-free FCs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // 2, bias=False)
        self.fc2 = nn.Linear(channels // 2, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3, 4))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None, None]


class SepBlock(nn.Module):
    """SepNet block (cin -> cout); see the module docstring."""

    def __init__(self, cin: int, cout: int, *, axis: str = "z", se: bool = False, fast: bool = True):
        super().__init__()
        k2, k1 = _kernels(axis)
        self.conv1 = AxisConv3d(cin, cout, k2, fast=fast)
        self.conv2 = AxisConv3d(cout, cout, k1, fast=fast)
        self.conv3 = AxisConv3d(cout, cout, k2, fast=fast)
        self.conv4 = AxisConv3d(cout, cout, k2, fast=fast)
        self.skip = AxisConv3d(cin, cout, (1, 1, 1), fast=fast)
        self.norms = nn.ModuleList(_norm(cout) for _ in range(5))
        self.se = SqueezeExcite(cout) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for conv, norm in zip((self.conv1, self.conv2, self.conv3, self.conv4), self.norms):
            y = F.relu(norm(conv(y)), inplace=True)  # group_norm's backward needs its input, not output
        y = F.relu(self.norms[4](y + self.skip(x)), inplace=True)
        return self.se(y) if self.se is not None else y


class UnetUnit(nn.Module):
    """3x3x3 conv -> IN -> ReLU; with ``residual`` ReLU(IN(conv(x) + conv1x1x1(x)))."""

    def __init__(self, cin: int, cout: int, *, residual: bool = False, fast: bool = True):
        super().__init__()
        self.conv = AxisConv3d(cin, cout, (3, 3, 3), fast=fast)
        self.skip = AxisConv3d(cin, cout, (1, 1, 1), fast=fast) if residual else None
        self.norm = _norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return F.relu(self.norm(y), inplace=True)


class UnetBlock(nn.Module):
    """Two units (cin -> cmid -> cout), optionally followed by squeeze-excitation."""

    def __init__(self, cin: int, cmid: int, cout: int, *, residual: bool = False, se: bool = False, fast=True):
        super().__init__()
        self.unit1 = UnetUnit(cin, cmid, residual=residual, fast=fast)
        self.unit2 = UnetUnit(cmid, cout, residual=residual, fast=fast)
        self.se = SqueezeExcite(cout) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unit2(self.unit1(x))
        return self.se(y) if self.se is not None else y


def _check_shape(x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"network input must be (B, C, Z, Y, X), got shape {tuple(x.shape)}")
    bad = [f"{n}={s}" for n, s in zip("ZYX", x.shape[2:]) if s % 8]
    if bad:
        raise ValueError(
            f"network input spatial size {tuple(x.shape[2:])} is not divisible by 8 ({', '.join(bad)}): "
            "three 2x max-poolings halve every axis, including depth; use patches like 16x128x128"
        )


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class _EncDec(nn.Module):
    """Shared 4-level encoder/decoder skeleton: enc[0..2], bottleneck (sequence), dec[0..2] (deepest first)."""

    channels_last = False
    checkpoint_blocks = False  # set by set_checkpointing

    def __init__(self, enc, bottleneck, dec, head_in: int, num_classes: int, fast: bool):
        super().__init__()
        self.enc = nn.ModuleList(enc)
        self.bottleneck = nn.Sequential(*bottleneck)
        self.dec = nn.ModuleList(dec)
        self.head_dropout = nn.Dropout3d(0.1)
        self.head = AxisConv3d(head_in, num_classes, (1, 1, 1), fast=fast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x)
        if self.channels_last and self._fast():
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips = []
        for block in self.enc:
            x = self._block(block, x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for block in self.bottleneck:
            x = self._block(block, x)
        for block, skip in zip(self.dec, reversed(skips)):
            x = self._block(block, torch.cat([_up(x), skip], dim=1))
        return self.head(self.head_dropout(x)).contiguous()

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``block(x)``; under :func:`set_checkpointing` (training with gradients) its activations are not
        kept but recomputed in the backward pass (one more forward of the block, far less memory)."""
        if not (self.checkpoint_blocks and torch.is_grad_enabled()) or isinstance(block, nn.Dropout):
            return block(x)
        if isinstance(block, nn.Sequential):  # one block at a time: the backward recomputes one, not two
            for b in block:
                x = self._block(b, x)
            return x
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)

    def _fast(self) -> bool:
        return self.head.fast


class SepNet(_EncDec):
    """3D-SepNet (optionally with squeeze-excitation per block)."""

    channels_last = False

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        base: int = 24,
        separable_axis: str = "z",
        se: bool = False,
        fast: bool = True,
    ):
        b = base

        def blk(cin, cout):
            return SepBlock(cin, cout, axis=separable_axis, se=se, fast=fast)

        enc = [blk(in_channels, 2 * b), blk(2 * b, 2 * b), blk(2 * b, 4 * b)]
        # one element-wise Dropout(0.5) after the second bottleneck block, as the reference code
        bottleneck = [blk(4 * b, 8 * b), blk(8 * b, 4 * b), nn.Dropout(0.5)]
        dec = [
            nn.Sequential(blk(8 * b, 4 * b), blk(4 * b, 2 * b)),
            nn.Sequential(blk(4 * b, 2 * b), blk(2 * b, 2 * b)),
            nn.Sequential(blk(4 * b, 2 * b), blk(2 * b, 2 * b)),
        ]
        super().__init__(enc, bottleneck, dec, 2 * b, num_classes, fast)
        self.separable_axis = separable_axis


class UNet3D(_EncDec):
    """3D U-Net baseline (Cicek et al. channel plan), optional residual units or SE per level block."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        base: int = 24,
        residual: bool = False,
        se: bool = False,
        fast: bool = True,
    ):
        b = base

        def blk(cin, cmid, cout):
            return UnetBlock(cin, cmid, cout, residual=residual, se=se, fast=fast)

        enc = [blk(in_channels, b, 2 * b), blk(2 * b, 2 * b, 4 * b), blk(4 * b, 4 * b, 8 * b)]
        bottleneck = [blk(8 * b, 8 * b, 16 * b), nn.Dropout(0.5)]  # as the reference U-Net
        dec = [blk(24 * b, 8 * b, 8 * b), blk(12 * b, 4 * b, 4 * b), blk(6 * b, 2 * b, 2 * b)]
        super().__init__(enc, bottleneck, dec, 2 * b, num_classes, fast)


def build(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    base: int = 24,
    separable_axis: str = "z",
    fast: bool = False,
    seed: int | None = None,
) -> nn.Module:
    """Build a network by name (one of ``NETWORKS``); returns an ``nn.Module`` giving logits.

    Args:
        name: "sepnet", "sepnet_se", "unet3d", "unet3d_res" or "unet3d_se".
        in_channels: input channels (number of intensity transforms stacked).
        num_classes: output classes incl. background (23 for StructSeg).
        base: b in the channel plan (24: the paper's SepNet, and its baselines' "48 base channels" = 2b).
        separable_axis: SepNet's inter-slice axis, "z" (default), "y" or "x"; ignored by the U-Nets.
        fast: use the conv2d view path of :class:`AxisConv3d` (same weights, same outputs); off by default
            because plain conv3d measured as fast or faster on CPU (module docstring).
        seed: if given, parameters are initialised from ``torch.manual_seed(seed)`` inside a forked RNG
            (the global RNG is left untouched); None uses the current global RNG.

    Raises:
        ValueError: unknown name (lists the known ones), bad separable_axis or channel counts.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")
    if in_channels < 1 or num_classes < 1 or base < 2 or base % 2:
        raise ValueError(
            f"in_channels, num_classes must be >= 1 and base even >= 2; got {in_channels}, {num_classes}, {base}"
        )
    _kernels(separable_axis)  # validates

    def make() -> nn.Module:
        if name in ("sepnet", "sepnet_se"):
            return SepNet(
                in_channels, num_classes, base=base, separable_axis=separable_axis, se=name == "sepnet_se", fast=fast
            )
        return UNet3D(
            in_channels, num_classes, base=base, residual=name == "unet3d_res", se=name == "unet3d_se", fast=fast
        )

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def set_fast(model: nn.Module, fast: bool) -> nn.Module:
    """Switch every :class:`AxisConv3d` of ``model`` to the fast conv2d path or the reference conv3d path."""
    for m in model.modules():
        if isinstance(m, AxisConv3d):
            m.fast = fast
    return model


def set_channels_last(model: nn.Module, flag: bool) -> nn.Module:
    """Run ``model``'s fast path in ``channels_last_3d`` (SepNet's default) or in the default memory format."""
    for m in model.modules():
        if isinstance(m, _EncDec):
            m.channels_last = flag
            for conv in m.modules():
                if isinstance(conv, AxisConv3d):
                    conv.channels_last = flag and conv is not m.head
    return model


def set_checkpointing(model: nn.Module, flag: bool) -> nn.Module:
    """Activation checkpointing per block (``torch.utils.checkpoint``, non-reentrant) on or off: the
    gradients are the same, a block's intermediate activations are recomputed in the backward pass instead
    of stored (SepNet keeps ~11 full-size tensors per block, a 3D U-Net block 4)."""
    for m in model.modules():
        if isinstance(m, _EncDec):
            m.checkpoint_blocks = bool(flag)
    return model


def to_plain_conv3d(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose :class:`AxisConv3d` modules are plain ``nn.Conv3d`` with the same weights.

    The state_dict keys and shapes are identical, so ``plain.load_state_dict(model.state_dict())`` works both ways.
    """
    plain = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for cname, child in parent.named_children():
            if isinstance(child, AxisConv3d):
                conv = nn.Conv3d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    padding=child.padding,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                conv.load_state_dict(child.state_dict())
                setattr(parent, cname, conv)
            else:
                swap(child)

    swap(plain)
    # the plain model keeps the default memory format
    for m in plain.modules():
        if isinstance(m, _EncDec):
            m.channels_last = False
    return plain
