"""Tests of the model zoo and build_model's name forms and errors."""

import json

import pytest
import torch
from torch import nn

from rlpruner_ray.errors import ModelError, RLPrunerError
from rlpruner_ray.models import build_from_spec, build_model, list_models, model_spec

ZOO = [
    "resnet8", "resnet20", "resnet32", "resnet56", "resnet110",
    "vgg11", "vgg13", "vgg16", "vgg19",
    "googlenet", "densenet121", "mobilenetv3_small", "mobilenetv3_large",
]

torch.set_num_threads(2)


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears, "model has no nn.Linear"
    return linears[-1]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward(model: nn.Module, c: int, size: int = 32) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, c, size, size))


def test_list_models_is_the_zoo():
    assert sorted(list_models()) == sorted(ZOO)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("num_classes,in_channels", [(10, 3), (7, 1)])
def test_zoo_builds_and_forwards(name, num_classes, in_channels):
    model = build_model(name, num_classes, in_channels)
    assert isinstance(model, nn.Module)
    assert _forward(model, in_channels).shape == (2, num_classes)
    assert _last_linear(model).out_features == num_classes


@pytest.mark.parametrize("name", ZOO)
def test_zoo_accepts_8x8_inputs(name):
    # Adaptive pooling (and ceil-mode pools) must keep tiny inputs valid.
    assert _forward(build_model(name, 5, 2), 2, size=8).shape == (2, 5)


def test_train_mode_forward_and_backward():
    model = build_model("resnet8", 10)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert model.conv1.weight.grad is not None


def test_names_are_case_insensitive():
    assert _n_params(build_model("ResNet20", 10)) == _n_params(build_model("resnet20", 10))
    assert isinstance(build_model("  VGG11 ", 10), nn.Module)


@pytest.mark.parametrize(
    "name,low,high",
    [
        # He et al. report 0.85M for ResNet-56; the 1x1 projection shortcuts add ~3k.
        ("resnet56", 0.84e6, 0.87e6),
        ("resnet20", 0.26e6, 0.28e6),
        ("resnet110", 1.7e6, 1.75e6),
        # 20.03M conv+BN stack + 0.26M 512->512 head + 5k output layer.
        ("vgg19", 20.2e6, 20.4e6),
        ("vgg16", 14.9e6, 15.1e6),
        ("googlenet", 6.1e6, 6.2e6),
        ("densenet121", 6.9e6, 7.0e6),
        ("mobilenetv3_small", 1.4e6, 1.6e6),
        ("mobilenetv3_large", 4.1e6, 4.3e6),
    ],
)
def test_parameter_counts(name, low, high):
    n = _n_params(build_model(name, 10))
    assert low <= n <= high, f"{name}: {n} parameters"


def test_resnet_uses_projection_shortcuts():
    model = build_model("resnet20", 10)
    shortcut_convs = [
        m for name, m in model.named_modules()
        if "shortcut" in name and isinstance(m, nn.Conv2d)
    ]
    # One projection at the start of stages 2 and 3.
    assert len(shortcut_convs) == 2
    assert all(c.kernel_size == (1, 1) for c in shortcut_convs)


def test_first_conv_takes_in_channels():
    for name in ZOO:
        model = build_model(name, 10, 4)
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == 4, name


@pytest.mark.parametrize("tv_name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_with_one_channel(tv_name):
    model = build_model(f"tv:{tv_name}", 7, 1)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    assert _last_linear(model).out_features == 7
    assert _forward(model, 1).shape == (2, 7)


def test_torchvision_three_channels_keeps_first_conv():
    model = build_model("TV:resnet18", 10)
    assert model.conv1.in_channels == 3
    assert model.fc.out_features == 10


def test_torchvision_googlenet_has_no_aux_heads():
    model = build_model("tv:googlenet", 10)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_factory_path():
    model = build_model("tests.helpers_models:tiny", 7, 1)
    assert _forward(model, 1).shape == (2, 7)
    assert _last_linear(model).out_features == 7


def _error(name, num_classes=10, in_channels=3) -> str:
    with pytest.raises(ModelError) as info:
        build_model(name, num_classes, in_channels)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip()
    return msg


def test_model_error_is_a_user_error():
    assert issubclass(ModelError, RLPrunerError)


def test_unknown_zoo_name_lists_valid_names():
    msg = _error("resnet57")
    assert "resnet57" in msg
    for name in ZOO:
        assert name in msg


def test_empty_name():
    assert "resnet56" in _error("  ")


def test_unknown_torchvision_name():
    assert "not_a_real_net" in _error("tv:not_a_real_net")


def test_torchvision_non_classification_name():
    # Detection models are in torchvision but are not classifiers.
    assert "fasterrcnn_resnet50_fpn" in _error("tv:fasterrcnn_resnet50_fpn")


def test_bad_import_path():
    msg = _error("no_such_pkg_xyz.mod:factory")
    assert "no_such_pkg_xyz.mod" in msg


def test_missing_factory_attribute():
    msg = _error("tests.helpers_models:does_not_exist")
    assert "does_not_exist" in msg


def test_malformed_factory_path():
    assert "pkg.module:factory" in _error("tests.helpers_models:")


def test_factory_not_callable():
    assert "not callable" in _error("tests.helpers_models:NOT_CALLABLE")


def test_factory_that_raises():
    msg = _error("tests.helpers_models:raises")
    assert "boom from factory" in msg and "RuntimeError" in msg


def test_factory_returning_non_module():
    msg = _error("tests.helpers_models:not_a_module")
    assert "dict" in msg and "nn.Module" in msg


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, True, "10"])
def test_bad_num_classes(num_classes):
    assert "num_classes" in _error("resnet8", num_classes=num_classes)


@pytest.mark.parametrize("in_channels", [0, -1, 1.0, None])
def test_bad_in_channels(in_channels):
    assert "in_channels" in _error("resnet8", in_channels=in_channels)


def test_spec_round_trip():
    spec = model_spec("ResNet20", 7, 1)
    assert spec == {"name": "resnet20", "num_classes": 7, "in_channels": 1}
    spec = json.loads(json.dumps(spec))
    a, b = build_from_spec(spec), build_model("resnet20", 7, 1)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    # The rebuilt model can load the original's weights, which is what checkpoints need.
    a.load_state_dict(b.state_dict())


def test_spec_keeps_tv_and_factory_names():
    assert model_spec("tv:resnet18", 10, 3)["name"] == "tv:resnet18"
    spec = model_spec("tests.helpers_models:tiny", 3, 2)
    assert _forward(build_from_spec(spec), 2).shape == (2, 3)


@pytest.mark.parametrize(
    "spec",
    [
        None,
        ["resnet8", 10, 3],
        {"name": "resnet8", "num_classes": 10},
        {"name": "resnet8", "num_classes": 10, "in_channels": 3, "depth": 8},
        {"name": "resnet8", "num_classes": 1, "in_channels": 3},
        {"name": "nope", "num_classes": 10, "in_channels": 3},
    ],
)
def test_bad_specs(spec):
    with pytest.raises(ModelError):
        build_from_spec(spec)


def test_model_spec_validates():
    with pytest.raises(ModelError):
        model_spec("resnet8", 1, 3)
    with pytest.raises(ModelError):
        model_spec("", 10, 3)
