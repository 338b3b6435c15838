"""Models used by the benchmarks, with a small name registry.

Example:
    >>> from connect_tp.models import create_model
    >>> model = create_model("resnet20", num_classes=10, in_channels=1)
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from .cifar import BasicBlock, CifarResNet, CifarVGG, resnet20, resnet56, resnet110, vgg19_bn

__all__ = [
    "BasicBlock", "CifarResNet", "CifarVGG",
    "resnet20", "resnet56", "resnet110", "vgg19_bn",
    "MODEL_REGISTRY", "create_model",
]

MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg19_bn": vgg19_bn,
}


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a registered model by name.

    Raises:
        ValueError: if ``name`` is not in :data:`MODEL_REGISTRY`.
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](num_classes=num_classes, in_channels=in_channels)
