"""The benchmark models: shapes for any channels/classes, and the sizes Torch-Pruning reports."""
import pytest
import torch
import torch_pruning as tp

from connect_tp.models import MODEL_REGISTRY, create_model


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
@pytest.mark.parametrize("in_channels,num_classes", [(1, 10), (3, 100)])
def test_output_shape(name, in_channels, num_classes):
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    assert model(torch.rand(2, in_channels, 32, 32)).shape == (2, num_classes)


@pytest.mark.parametrize("name,num_classes,mmacs,mparams", [
    ("resnet20", 10, 41.4, 0.27),
    ("resnet56", 10, 127.4, 0.86),
    ("vgg19_bn", 100, 512.9, 20.09),
])
def test_size_matches_torch_pruning_benchmarks(name, num_classes, mmacs, mparams):
    macs, params = tp.utils.count_ops_and_params(create_model(name, num_classes), torch.rand(1, 3, 32, 32))
    assert macs / 1e6 == pytest.approx(mmacs, abs=0.05)
    assert params / 1e6 == pytest.approx(mparams, abs=0.005)


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="resnet56"):
        create_model("resnet57", num_classes=10)
