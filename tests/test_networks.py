from __future__ import annotations

import pytest
import torch
from torch import nn

from sepnet.core.networks import (
    NETWORKS,
    AxisConv3d,
    build,
    count_parameters,
    set_channels_last,
    set_fast,
    to_plain_conv3d,
)

# docs/conventions.md (b = 24, 1 input channel, 23 classes); unet3d_se is this toolkit's own count
EXPECTED = {
    "sepnet": 2_505_527,
    "sepnet_se": 2_586_167,
    "unet3d": 9_179_207,
    "unet3d_res": 9_520_823,
    "unet3d_se": 9_423_431,
}


@pytest.mark.parametrize("name", NETWORKS)
def test_parameter_counts(name):
    model = build(name, in_channels=1, num_classes=23, base=24)
    assert count_parameters(model) == EXPECTED[name]


def test_sepnet_to_unet_ratio_is_papers_about_a_third():
    assert EXPECTED["sepnet"] / EXPECTED["unet3d"] == pytest.approx(0.273, abs=5e-4)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("shape", [(16, 128, 128), (24, 96, 96)])
def test_output_shape(name, shape):
    model = build(name, in_channels=2, num_classes=5, base=2, seed=0).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, *shape))
    assert out.shape == (1, 5, *shape) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("axis", ["z", "y", "x"])
def test_separable_axis_kernels(axis):
    model = build("sepnet", in_channels=1, num_classes=2, base=2, separable_axis=axis)
    block = model.enc[0]
    i = "zyx".index(axis)
    assert block.conv2.kernel_size[i] == 3 and sum(block.conv2.kernel_size) == 5  # the 1-D conv
    assert block.conv1.kernel_size[i] == 1 and sum(block.conv1.kernel_size) == 7  # the 2-D conv
    assert block.conv1.weight.shape == (4, 1, *block.conv1.kernel_size)


def _impulse_response(kernel, *, fast):
    conv = AxisConv3d(1, 1, kernel, fast=fast)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    x = torch.zeros(1, 1, 5, 5, 5)
    x[0, 0, 2, 2, 2] = 1.0
    with torch.no_grad():
        return conv(x)[0, 0]


@pytest.mark.parametrize("fast", [True, False])
def test_impulse_response(fast):
    inter = _impulse_response((3, 1, 1), fast=fast)  # mixes neighbouring slices only
    assert inter[1, 2, 2] == 1 and inter[3, 2, 2] == 1 and inter[2, 2, 2] == 1
    assert inter.sum() == 3 and inter[2, 1, 2] == 0 and inter[2, 2, 1] == 0
    intra = _impulse_response((1, 3, 3), fast=fast)  # stays in its slice
    assert intra[2].sum() == 9 and intra[1].sum() == 0 and intra[3].sum() == 0
    assert intra[2, 1:4, 1:4].eq(1).all()
    along_y = _impulse_response((1, 3, 1), fast=fast)
    assert along_y[2, 1, 2] == 1 and along_y[2, 3, 2] == 1 and along_y.sum() == 3
    across_zx = _impulse_response((3, 1, 3), fast=fast)
    assert across_zx[:, 2].sum() == 9 and across_zx[1:4, 2, 1:4].eq(1).all()


@pytest.mark.parametrize("kernel", [(1, 3, 3), (3, 1, 1), (1, 1, 1), (3, 1, 3), (1, 3, 1), (3, 3, 1), (1, 1, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_axis_conv_fast_equals_conv3d(kernel, channels_last):
    gen = torch.Generator().manual_seed(0)
    conv = AxisConv3d(3, 4, kernel).double()
    x = torch.randn(2, 3, 4, 5, 6, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    ref = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=conv.padding)
    torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)


# separable_axis only concerns SepNet: the U-Nets are checked with the default axis
@pytest.mark.parametrize(
    "name, axis", [(n, a) for n in NETWORKS for a in (["z", "x"] if n.startswith("sepnet") else ["z"])]
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_model_equals_plain_conv3d_model(name, axis, channels_last):
    fast = build(name, in_channels=2, num_classes=3, base=4, separable_axis=axis, seed=1, fast=True).double().eval()
    set_channels_last(fast, channels_last)
    plain = to_plain_conv3d(fast)
    assert not any(isinstance(m, AxisConv3d) for m in plain.modules())
    assert sum(isinstance(m, nn.Conv3d) for m in plain.modules()) == sum(
        isinstance(m, AxisConv3d) for m in fast.modules()
    )
    x = torch.randn(2, 2, 8, 16, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        a, b = fast(x), plain(x)
        set_fast(fast, False)
        c = fast(x)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


def test_state_dict_interchangeable_and_gradients_match():
    fast = build("sepnet", in_channels=1, num_classes=3, base=4, seed=3, fast=True).double()
    plain = to_plain_conv3d(build("sepnet", in_channels=1, num_classes=3, base=4, seed=4)).double()
    sd = fast.state_dict()
    assert list(sd) == list(plain.state_dict())
    assert all(sd[k].shape == v.shape for k, v in plain.state_dict().items())
    plain.load_state_dict(sd)
    fast.eval(), plain.eval()
    x = torch.randn(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fast(x).square().mean().backward()
    plain(x).square().mean().backward()
    for (n, p), (_, q) in zip(fast.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=n)


def test_seed_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build("sepnet", in_channels=1, num_classes=2, base=2, seed=7)
    after = torch.rand(1)
    b = build("sepnet", in_channels=1, num_classes=2, base=2, seed=7)
    assert before == after
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", ["sepnet", "unet3d"])
def test_depth_not_divisible_by_8(name):
    model = build(name, in_channels=1, num_classes=2, base=2)
    with pytest.raises(ValueError, match=r"divisible by 8 \(Z=12\)"):
        model(torch.zeros(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match=r"Y=20"):
        model(torch.zeros(1, 1, 16, 20, 16))


def test_build_errors():
    with pytest.raises(ValueError, match="sepnet, sepnet_se, unet3d"):
        build("vnet", in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="separable_axis"):
        build("sepnet", in_channels=1, num_classes=2, separable_axis="t")


@pytest.mark.parametrize("name", NETWORKS)
def test_one_bottleneck_dropout_as_the_reference_code(name):
    """Reference code: SepNet conv5 -> Dropout(0.5); the U-Net one Dropout(0.5) after its bottleneck."""
    model = build(name, in_channels=1, num_classes=3, base=4, seed=0)
    half = [m for m in model.modules() if type(m) is nn.Dropout]
    assert [m.p for m in half] == [0.5]
    head = [m for m in model.modules() if type(m) is nn.Dropout3d]
    assert [m.p for m in head] == [0.1]
    # it acts on the output of the last bottleneck block, and only in training mode
    seen = {}
    blocks = [m for m in model.bottleneck if type(m) is not nn.Dropout]
    blocks[-1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("block", out.detach().clone()))
    half[0].register_forward_hook(lambda _m, inp, out: seen.update(inp=inp[0].detach(), out=out.detach()))
    x = torch.rand(1, 1, 16, 32, 32)
    model.train()
    model(x)
    assert torch.equal(seen["inp"], seen["block"])
    pos = seen["inp"] > 0  # post-ReLU features: dropout shows on the positive ones
    kept = seen["out"] != 0
    assert pos.sum() > 50 and 0.3 < kept[pos].float().mean().item() < 0.7
    assert torch.allclose(seen["out"][kept], 2 * seen["inp"][kept])
    model.eval()
    model(x)
    assert torch.equal(seen["out"], seen["inp"])


@pytest.mark.parametrize("name", ["sepnet", "unet3d"])
def test_cpu_bf16_training_step_has_finite_gradients_at_bottleneck_depth_2(name):
    # A 16-slice patch reaches the bottleneck at z = 2, where oneDNN's bf16 conv3d weight gradient of a
    # 3x1x1 kernel is NaN (torch 2.13); the network must route around it.
    from sepnet.core.inference import autocast

    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 1, 16, 32, 32), generator=g)
    y = torch.randint(0, 4, (2, 16, 32, 32), generator=g)
    net = build(name, in_channels=1, num_classes=4, base=8, seed=0)
    with autocast("cpu", torch.bfloat16):
        out = net(x)
    torch.nn.functional.cross_entropy(out.float(), y).backward()
    bad = [n for n, p in net.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad


def test_axis_conv_routes_short_axis_bf16_through_the_conv2d_view():
    # the 3x1x1 conv on a 2-slice input under CPU bf16: same output as float32 within bf16 precision,
    # finite weight gradient (plain conv3d gives NaN there)
    from sepnet.core.inference import autocast

    conv = AxisConv3d(32, 32, (3, 1, 1), fast=False)
    x = torch.randn(2, 32, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = conv(x)
    with autocast("cpu", torch.bfloat16):
        out = conv(x)
    out.float().pow(2).sum().backward()
    assert torch.isfinite(conv.weight.grad).all()
    assert torch.allclose(out.float(), ref, atol=0.05 * float(ref.abs().max()))


@pytest.mark.parametrize("name", ["sepnet", "unet3d_se"])
def test_checkpointed_blocks_give_the_same_gradients_and_keep_far_fewer_activations(name):
    """set_checkpointing: bit-identical gradients (dropout included: the recompute replays the RNG); the
    tensors kept for backward, counted by a saved-tensors hook, shrink to a fraction."""
    from sepnet.core.networks import set_checkpointing

    def step(flag):
        net = set_checkpointing(build(name, in_channels=1, num_classes=23, base=4, seed=0), flag).train()
        x = torch.rand(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
        kept = [0]

        def pack(t):
            kept[0] += t.numel() * t.element_size()
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        out.square().mean().backward()
        return kept[0], [p.grad for p in net.parameters()]

    full, g_full = step(False)
    ckpt, g_ckpt = step(True)
    assert all(torch.equal(a, b) for a, b in zip(g_full, g_ckpt))
    assert ckpt < 0.4 * full, (ckpt, full)
