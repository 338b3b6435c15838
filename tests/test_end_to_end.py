"""ConnectImportance inside Torch-Pruning's MetaPruner on a zoo of models.

One parametrized test over a small registry of cases gives breadth cheaply: the CIFAR models of
the paper pruned globally to a 2.5x MAC speed-up, and torchvision / timm models pruned locally.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from connect_tp import ConnectImportance
from connect_tp.models import resnet56, vgg19_bn


@dataclass
class Case:
    build: Callable[[], nn.Module]
    input_shape: tuple
    classes: int
    global_pruning: bool = False
    target_speed_up: float = 0.0      # prune until this MAC speed-up (global cases)
    pruning_ratio: float = 0.3         # else: one local step to this ratio
    pruner_kwargs: Callable[[nn.Module], Dict] = field(default=lambda model: {})
    after_step: Callable[[nn.Module, tp.pruner.MetaPruner], None] = field(default=lambda model, pruner: None)


def final_linear(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def torchvision_model(name):
    import torchvision

    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=10)


def small_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def vit_heads(model):
    from timm.layers import Attention

    heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
    return {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": 0.25}


def vit_update_heads(model, pruner):
    from timm.layers import Attention

    # timm reshapes with num_heads and attn_dim: tell it how many heads are left.
    for m in model.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.attn_dim = m.num_heads * m.head_dim


CASES = {
    "resnet56-global-2.5x": Case(lambda: resnet56(num_classes=10), (3, 32, 32), 10,
                                 global_pruning=True, target_speed_up=2.5),
    "vgg19_bn-global-2.5x": Case(lambda: vgg19_bn(num_classes=100), (3, 32, 32), 100,
                                 global_pruning=True, target_speed_up=2.5),
    "torchvision-resnet18": Case(torchvision_model("resnet18"), (3, 64, 64), 10),
    "torchvision-mobilenet_v2": Case(torchvision_model("mobilenet_v2"), (3, 64, 64), 10),
    "timm-vit": Case(small_vit, (3, 32, 32), 10, pruner_kwargs=vit_heads, after_step=vit_update_heads),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_prune_model_zoo(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    example = torch.rand(1, *case.input_shape)
    output_shape = model.eval()(example).shape
    base_macs, base_params = tp.utils.count_ops_and_params(model, example)
    steps = 20 if case.global_pruning else 1
    imp = ConnectImportance()
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, global_pruning=case.global_pruning,
        pruning_ratio=1.0 if case.global_pruning else case.pruning_ratio,
        iterative_steps=steps, ignored_layers=[final_linear(model)], **case.pruner_kwargs(model),
    )
    x = torch.rand(8, *case.input_shape)
    y = torch.randint(0, case.classes, (8,))
    speed_up = 1.0
    for _ in range(steps):
        model.train()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.step()
        case.after_step(model, pruner)
        macs, params = tp.utils.count_ops_and_params(model, example)
        speed_up = base_macs / macs
        if case.global_pruning and speed_up >= case.target_speed_up:
            break
    if case.global_pruning:
        assert speed_up >= case.target_speed_up
    else:
        assert speed_up > 1.2
    assert params < base_params
    assert imp.last_log_connectivity is not None
    model.eval()
    out = model(torch.rand(3, *case.input_shape))
    assert out.shape == (3,) + tuple(output_shape[1:])
    assert torch.isfinite(out).all()
