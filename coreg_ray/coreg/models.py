"""Backbones and the two-headed network Co-Reg trains (classifier `fc` + 128-d projector).

Registry: `BACKBONES[name](image_size) -> nn.Module` with a `feature_dim` attribute; a backbone
maps images to a flat feature vector. `build_model(name, num_classes, image_size)` adds the heads.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from coreg_ray.errors import CoregError

BACKBONES = {}


def register(name):
    def deco(fn):
        BACKBONES[name] = fn
        return fn
    return deco


class PreActBlock(nn.Module):
    """Pre-activation basic block as in the authors' `utils/resnet.py`:
    BN-ReLU -> conv3x3(stride) -> BN-ReLU -> conv3x3, plus a shortcut that is applied to the
    *pre-activated* input relu(bn1(x)) in both cases: a bias-free 1x1 conv (no BN) when the shape
    changes, the identity otherwise (so an identity shortcut carries relu(bn1(x)), not x)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else out
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class PreActResNet(nn.Module):
    """PreAct ResNet-18 as in the authors' `utils/resnet.py`: stem conv3x3(3->64, stride 1) ->
    BN -> ReLU, then [2,2,2,2] PreActBlocks at 64/128/256/512 with strides 1/2/2/2 (2/2/2/2 from
    64 px up: their `input_size == "64x64"` case), no BN-ReLU after the last block, then average
    pooling (theirs is avg_pool2d(., 4), which is global for the 4x4 maps of 32/64/28 px inputs;
    adaptive pooling here so other sizes also give one 512-d vector)."""

    def __init__(self, blocks=(2, 2, 2, 2), image_size=32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = (64, 128, 256, 512)
        first_stride = 2 if image_size >= 64 else 1
        layers, cin = [], 64
        for i, (n, cout) in enumerate(zip(blocks, widths)):
            stride = first_stride if i == 0 else 2
            for j in range(n):
                layers.append(PreActBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.feature_dim = 512

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register("preact_resnet18")
def preact_resnet18(image_size=32):
    return PreActResNet((2, 2, 2, 2), image_size)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (32/64/128); for CPU tests and quick experiments."""

    def __init__(self, width=32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
        )
        self.feature_dim = 4 * w

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.net(x), 1).flatten(1)


@register("small_cnn")
def small_cnn(image_size=32):
    return SmallCNN(32)


@register("tiny_cnn")
def tiny_cnn(image_size=32):
    return SmallCNN(8)


class MLP(nn.Module):
    """For 8x8 digits: flatten -> 256 -> 128, BN + ReLU."""

    def __init__(self, image_size=8, hidden=256, out=128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden),
                                 nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out), nn.BatchNorm1d(out), nn.ReLU(inplace=True))
        self.feature_dim = out

    def forward(self, x):
        return self.net(x)


@register("mlp")
def mlp(image_size=8):
    return MLP(image_size)


class CoRegNet(nn.Module):
    """backbone -> feature; `fc` -> logits; projector (d -> d -> ReLU -> proj_dim) -> unit z."""

    def __init__(self, backbone: nn.Module, num_classes: int, proj_dim: int = 128):
        super().__init__()
        d = backbone.feature_dim
        self.backbone = backbone
        self.fc = nn.Linear(d, num_classes)
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, x, project: bool = False):
        feat = self.backbone(x)
        logits = self.fc(feat)
        if not project:
            return logits
        return logits, F.normalize(self.projector(feat).float(), dim=1)


def build_model(name: str, num_classes: int, image_size: int, proj_dim: int = 128) -> CoRegNet:
    if name not in BACKBONES:
        raise CoregError(f"unknown backbone '{name}' (available: {', '.join(sorted(BACKBONES))})")
    return CoRegNet(BACKBONES[name](image_size), num_classes, proj_dim)
