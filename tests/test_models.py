"""The networks: parameter counts, every layer shape, and typed errors for inputs they cannot take."""

from __future__ import annotations

import pytest
import torch

from cnnserve.errors import InvalidInputError, NotFoundError, ShapeMismatchError
from cnnserve.models import AlexNet, LeNet, build_model, get_spec
from cnnserve.shapes import layer_shapes, parse_shape


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_spec() -> None:
    assert count(LeNet()) == 61_706
    assert count(AlexNet()) == 61_100_840
    assert count(AlexNet(num_classes=10)) == 61_100_840 - 4097 * 990


def test_models_are_written_the_torchvision_way() -> None:
    for model in (LeNet(), AlexNet()):
        assert isinstance(model.features, torch.nn.Sequential)
        assert isinstance(model.classifier, torch.nn.Sequential)
    assert sum(isinstance(m, torch.nn.ReLU) for m in AlexNet().modules()) == 7


def test_forward_shapes() -> None:
    assert LeNet()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert AlexNet(num_classes=7).eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 7)
    assert LeNet(num_classes=3, in_channels=3)(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_alexnet_layer_shapes_at_224() -> None:
    table = layer_shapes(AlexNet(), (3, 224, 224))
    outputs = {row.name: row.output_shape for row in table.layers}
    expected_chain = [
        ("features.0", (64, 55, 55)),
        ("features.2", (64, 27, 27)),
        ("features.3", (192, 27, 27)),
        ("features.5", (192, 13, 13)),
        ("features.6", (384, 13, 13)),
        ("features.8", (256, 13, 13)),
        ("features.10", (256, 13, 13)),
        ("features.12", (256, 6, 6)),
    ]
    for name, shape in expected_chain:
        assert outputs[name] == shape, name
    first_fc_input = next(row.input_shape for row in table.layers if row.name == "classifier.1")
    assert first_fc_input == (9216,)
    assert table.output_shape == (1000,)
    assert table.total_parameters == 61_100_840
    assert table.trainable_parameters == 61_100_840
    assert table.parameter_bytes == 61_100_840 * 4
    # conv1 MACs: 64*55*55 outputs, each 3*11*11 multiply-adds
    assert next(r.macs for r in table.layers if r.name == "features.0") == 64 * 55 * 55 * 3 * 11 * 11
    assert [r.type for r in table.layers].count("ReLU") == 7


def test_lenet_layer_shapes() -> None:
    table = layer_shapes(LeNet(), (1, 32, 32))
    assert [(r.name, r.output_shape) for r in table.layers[:6]] == [
        ("features.0", (6, 28, 28)),
        ("features.1", (6, 28, 28)),
        ("features.2", (6, 14, 14)),
        ("features.3", (16, 10, 10)),
        ("features.4", (16, 10, 10)),
        ("features.5", (16, 5, 5)),
    ]
    assert table.layers[6].input_shape == (400,)
    assert table.total_parameters == 61_706
    assert sum(r.parameters for r in table.layers) == 61_706
    assert "Total params: 61,706" in table.format()


def test_layer_shapes_for_other_sizes_and_frozen_layers() -> None:
    model = LeNet()
    for parameter in model.features.parameters():
        parameter.requires_grad = False
    table = layer_shapes(model, (1, 33, 33))  # 29 -> 14 -> 10 -> 5: the head still fits
    assert table.layers[0].output_shape == (6, 29, 29)
    assert table.layers[5].output_shape == (16, 5, 5)
    assert table.trainable_parameters == 61_706 - 156 - 2_416
    assert not table.layers[0].trainable and table.layers[-1].trainable


def test_layer_shapes_does_not_touch_weights() -> None:
    model = LeNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_shapes(model, (1, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize(
    ("model", "shape", "layer"),
    [
        (AlexNet(), (3, 32, 32), "features.12"),
        (AlexNet(), (3, 64, 64), "classifier.1"),
        (LeNet(), (1, 8, 8), "features.3"),
        (LeNet(), (3, 32, 32), "features.0"),
        (AlexNet(), (1, 224, 224), "features.0"),
    ],
)
def test_inputs_the_network_cannot_take_name_the_layer(
    model: torch.nn.Module, shape: tuple[int, ...], layer: str
) -> None:
    with pytest.raises(ShapeMismatchError) as caught:
        layer_shapes(model, shape)
    assert caught.value.layer == layer
    assert layer in caught.value.message
    assert caught.value.violations[0].field == "input_shape"


def test_parse_shape() -> None:
    assert parse_shape("3,224,224") == (3, 224, 224)
    assert parse_shape("1x32x32") == (1, 32, 32)
    for bad in ("3,224", "a,b,c", "0,32,32", "-1,2,3"):
        with pytest.raises(InvalidInputError, match="input_shape"):
            parse_shape(bad)


def test_registry() -> None:
    from cnnserve.architectures import ARCHITECTURES
    from cnnserve.models import MODELS

    assert sorted(ARCHITECTURES) == sorted(MODELS)
    assert get_spec("lenet").input_shape == (1, 32, 32)
    assert get_spec("alexnet").input_shape == (3, 224, 224)
    assert count(build_model("alexnet", num_classes=10)) == count(AlexNet(num_classes=10))
    with pytest.raises(NotFoundError, match="unknown model architecture"):
        get_spec("resnet")
