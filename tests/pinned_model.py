"""The fixed ResNet-20 whose CoNNect scores are pinned (tests/test_pinned_scores.py).

Also imported by the script that produced ``tests/reference/pinned_resnet20_lam100.json`` from the code of
git commit 6146786, so both sides build exactly the same model, gradients and groups.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from connect_tp.models import resnet20


def pinned_resnet20() -> nn.Module:
    """Seeded ResNet-20 with non-trivial BatchNorm statistics and the gradient of one fixed batch."""
    torch.manual_seed(20)
    model = resnet20(num_classes=10)
    g = torch.Generator().manual_seed(21)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32, generator=g))
    model.eval()
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return model


def pinned_groups(model: nn.Module):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
    return list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))


def fingerprint(model: nn.Module) -> torch.Tensor:
    """Sums that change if torch's initialization or random streams ever change."""
    with torch.no_grad():
        return torch.stack([
            sum(p.double().abs().sum() for p in model.parameters()),
            sum(p.grad.double().abs().sum() for p in model.parameters()),
            sum(b.double().abs().sum() for n, b in model.named_buffers() if b.is_floating_point()),
        ])
