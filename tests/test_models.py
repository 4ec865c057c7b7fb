"""PreAct ResNet-18 pinned to the authors' `utils/resnet.py` (Portugas0807/Co-Reg)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from coreg_ray.coreg.models import BACKBONES, PreActBlock, PreActResNet, build_model


def _reference_param_count():
    """By hand from their layer list: conv3x3(3, 64) + BN(64); per block BN(cin),
    conv3x3(cin, cout), BN(cout), conv3x3(cout, cout), plus a bias-free 1x1 conv (no BN) where
    the shape changes."""
    bn = lambda c: 2 * c  # noqa: E731  (weight + bias)
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731
    n = conv(3, 64, 3) + bn(64)
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for j in range(2):
            s = stride if j == 0 else 1
            n += bn(cin) + conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3)
            if s != 1 or cin != cout:
                n += conv(cin, cout, 1)
            cin = cout
    return n


def test_preact_resnet18_parameter_count_equals_the_reference():
    net = BACKBONES["preact_resnet18"](32)
    assert _reference_param_count() == 11_166_144
    assert sum(p.numel() for p in net.parameters()) == 11_166_144
    assert net.feature_dim == 512
    # the heads: fc 512 -> C and the 512 -> 512 -> ReLU -> 128 projector (their MyResNet 'mlp')
    model = build_model("preact_resnet18", 10, 32)
    heads = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert heads == (512 * 10 + 10) + (512 * 512 + 512) + (512 * 128 + 128)


def test_preact_resnet18_layer_list_order():
    net = PreActResNet((2, 2, 2, 2), 32)
    assert [n for n, _ in net.named_children()] == ["conv1", "bn1", "layers"]
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert net.conv1.bias is None
    blocks = list(net.layers)
    assert len(blocks) == 8
    spec = [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0], b.shortcut is not None)
            for b in blocks]
    assert spec == [(64, 64, 1, False), (64, 64, 1, False), (64, 128, 2, True),
                    (128, 128, 1, False), (128, 256, 2, True), (256, 256, 1, False), (256, 512, 2, True),
                    (512, 512, 1, False)]
    for b in blocks:
        assert [n for n, _ in b.named_children()][:4] == ["bn1", "conv1", "bn2", "conv2"]
        if b.shortcut is not None:  # a bare bias-free 1x1 conv: no BN on the shortcut
            assert isinstance(b.shortcut, nn.Conv2d)
            assert b.shortcut.kernel_size == (1, 1) and b.shortcut.bias is None


def _randomise_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.2
            m.running_var = 0.5 + torch.rand(m.num_features, generator=g)


def test_shortcuts_take_the_pre_activated_input():
    """Both shortcut kinds see relu(bn1(x)), as in their forward (`shortcut = self.shortcut(out)`
    after `out = relu(bn1(x))`), not the raw x."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    for cout, stride in ((8, 1), (16, 2)):
        blk = PreActBlock(8, cout, stride).eval()
        _randomise_bn(blk)
        pre = F.relu(blk.bn1(x))
        main = blk.conv2(F.relu(blk.bn2(blk.conv1(pre))))
        short = pre if blk.shortcut is None else F.conv2d(pre, blk.shortcut.weight, stride=stride)
        with torch.no_grad():
            assert torch.allclose(blk(x), main + short, atol=1e-5)
            if blk.shortcut is None:  # the raw-input variant differs: the test can tell them apart
                assert not torch.allclose(blk(x), main + x, atol=1e-3)


def test_forward_is_stem_bn_relu_blocks_then_pool():
    """Their order: conv1 -> bn1 -> relu -> layer1..4 -> average pool; no BN-ReLU at the end."""
    torch.manual_seed(1)
    net = PreActResNet((2, 2, 2, 2), 32).eval()
    _randomise_bn(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = F.relu(net.bn1(net.conv1(x)))
        for blk in net.layers:
            out = blk(out)
        assert out.shape == (2, 512, 4, 4)
        expected = F.avg_pool2d(out, 4).flatten(1)  # their avg_pool2d(out, 4) on the 4x4 map
        assert torch.allclose(net(x), expected, atol=1e-5)


def test_first_stage_stride_two_from_64_px():
    """Their `input_size == "64x64"` makes layer1 stride 2: the last map is 4x4 at 64 px too."""
    for size, first in ((32, 1), (28, 1), (64, 2)):
        net = PreActResNet((2, 2, 2, 2), size).eval()
        assert net.layers[0].conv1.stride == (first, first)
        # a stride-2 first block gets a 1x1 shortcut conv 64 -> 64 (their `stride != 1` rule)
        extra = 64 * 64 if first == 2 else 0
        assert sum(p.numel() for p in net.parameters()) == 11_166_144 + extra
        assert (net.layers[0].shortcut is not None) == (first == 2)
        feats = {}
        net.layers[-1].register_forward_hook(lambda m, i, o: feats.update(last=o.shape))
        with torch.no_grad():
            assert net(torch.randn(1, 3, size, size)).shape == (1, 512)
        assert tuple(feats["last"][2:]) == (4, 4)  # 32 -> 4, 28 -> 4 (28-14-7-4), 64 -> 4
