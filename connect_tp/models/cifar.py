"""CIFAR-style ResNets and VGG as used by Torch-Pruning's CIFAR benchmarks.

ResNet-20/56/110 are the three-stage ResNets of He et al. (2016) with 16/32/64 channels and a
1x1 convolution + BatchNorm shortcut where the shape changes. VGG-19-BN keeps 4x4 feature maps in
its last two stages and ends in global average pooling and one linear layer, which gives the
~513 M MACs / 20.1 M parameters (100 classes) that Torch-Pruning reports for its CIFAR VGG-19.

Every model accepts any number of input channels (``in_channels``) and classes
(``num_classes``), so the same definitions serve Fashion-MNIST (1 channel) and CIFAR (3 channels).

Example:
    >>> import torch
    >>> from connect_tp.models import resnet56
    >>> model = resnet56(num_classes=10)
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["CifarResNet", "BasicBlock", "CifarVGG", "resnet20", "resnet56", "resnet110", "vgg19_bn"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """Three-stage ResNet for 32x32 images with ``(depth - 2) / 6`` blocks per stage."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n + 2 (20, 56, 110, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_VGG19_STAGES = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 images: max-pool after the first three stages only."""

    def __init__(self, stages=_VGG19_STAGES, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        layers, c_in = [], in_channels
        for i, stage in enumerate(stages):
            for c_out in stage:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for CIFAR (~41 M MACs, 0.27 M parameters)."""
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for CIFAR (~127 M MACs, 0.86 M parameters)."""
    return CifarResNet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 for CIFAR (~255 M MACs, 1.7 M parameters)."""
    return CifarResNet(110, num_classes, in_channels)


def vgg19_bn(num_classes: int = 100, in_channels: int = 3) -> CifarVGG:
    """VGG-19 with BatchNorm for CIFAR (~513 M MACs, 20.1 M parameters with 100 classes)."""
    return CifarVGG(_VGG19_STAGES, num_classes, in_channels)
