"""Model zoo and the single entry point :func:`build_model`.

Three kinds of names are accepted:

* a zoo name (case-insensitive), see :func:`list_models`;
* ``"tv:<name>"``: a torchvision classification model, built untrained;
* ``"pkg.module:factory"``: a user factory called as
  ``factory(num_classes=..., in_channels=...)`` that returns an ``nn.Module``.

The pruner finds the layers producing a model's output on its traced graph
(a linear or a 1x1 conv classifier alike) and never removes their outputs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from ..errors import ModelError, one_line
from .densenet import densenet121
from .googlenet import googlenet
from .mobilenetv3 import mobilenetv3_large, mobilenetv3_small
from .resnet import resnet8, resnet20, resnet32, resnet56, resnet110
from .vgg import vgg11, vgg13, vgg16, vgg19

__all__ = ["build_model", "check_model_name", "list_models", "model_spec", "build_from_spec"]

_ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "googlenet": googlenet,
    "densenet121": densenet121,
    "mobilenetv3_small": mobilenetv3_small,
    "mobilenetv3_large": mobilenetv3_large,
}

# torchvision models whose default (untrained) build has auxiliary heads that
# make train-mode forward return a tuple; the pruner wants a plain tensor.
_TV_NO_AUX = {"googlenet", "inception_v3"}


def list_models() -> list[str]:
    """Zoo names accepted by :func:`build_model` (without ``tv:`` / factory forms)."""
    return sorted(_ZOO)


def _check_sizes(num_classes: Any, in_channels: Any) -> None:
    # bool is an int subclass; True classes would be a silent bug.
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ModelError(f"in_channels must be an integer >= 1, got {in_channels!r}")


def _replace_first_conv(model: nn.Module, in_channels: int, label: str) -> None:
    """Swap the first nn.Conv2d (module order) for one taking in_channels inputs."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ModelError(
                    f"model {label!r}: first conv {name!r} is grouped (groups={module.groups}); "
                    "cannot change its input channels"
                )
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return
    raise ModelError(f"model {label!r} has no nn.Conv2d; cannot set in_channels={in_channels}")


def _torchvision_key(tv_name: str, label: str) -> str:
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency
        raise ModelError(f"model {label!r} needs torchvision, which cannot be imported: {one_line(exc)}") from exc
    key = tv_name.strip().lower()
    if key not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown torchvision classification model {tv_name!r} in {label!r}; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    return key


def _build_torchvision(tv_name: str, num_classes: int, in_channels: int, label: str) -> nn.Module:
    import torchvision
    key = _torchvision_key(tv_name, label)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if key in _TV_NO_AUX:
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True  # silences torchvision's init warning
    try:
        model = torchvision.models.get_model(key, **kwargs)
    except Exception as exc:
        raise ModelError(f"torchvision model {label!r} failed to build: {one_line(exc)}") from exc
    if in_channels != 3:
        _replace_first_conv(model, in_channels, label)
    return model


def _resolve_factory(path: str):
    module_name, _, attr_path = path.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not module_name or not attr_path:
        raise ModelError(f"bad factory path {path!r}: expected 'pkg.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"cannot import module {module_name!r} of factory {path!r}: {one_line(exc)}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelError(f"factory {path!r}: {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise ModelError(f"factory {path!r} is not callable (got {type(obj).__name__})")
    return obj


def _build_factory(path: str, num_classes: int, in_channels: int) -> nn.Module:
    obj = _resolve_factory(path)
    try:
        model = obj(num_classes=num_classes, in_channels=in_channels)
    except Exception as exc:
        raise ModelError(f"factory {path!r} raised {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {path!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


SPEC_ATTR = "_rlpruner_spec"  # what a model file needs to rebuild the architecture


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    model = _build(name, num_classes, in_channels)
    setattr(model, SPEC_ATTR, model_spec(name, num_classes, in_channels))
    return model


def check_model_name(name: str) -> None:
    """Refuse a name no model can be built from, without building one (so the CLI
    can refuse before it loads any data). A factory's module is imported."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}; zoo models: {', '.join(list_models())}")
    label = name.strip()
    if label.lower().startswith("tv:"):
        _torchvision_key(label[3:], label)
    elif ":" in label:
        _resolve_factory(label)
    elif label.lower() not in _ZOO:
        raise ModelError(
            f"unknown model {name!r}; zoo models: {', '.join(list_models())} "
            "(or 'tv:<torchvision name>' or 'pkg.module:factory')"
        )


def _build(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build an untrained model from a zoo name, ``tv:<name>`` or ``pkg.module:factory``.

    Raises :class:`~rlpruner_ray.errors.ModelError` on any bad input.
    """
    check_model_name(name)
    _check_sizes(num_classes, in_channels)
    label = name.strip()
    if label.lower().startswith("tv:"):
        return _build_torchvision(label[3:], num_classes, in_channels, label)
    if ":" in label:
        return _build_factory(label, num_classes, in_channels)
    return _ZOO[label.lower()](num_classes=num_classes, in_channels=in_channels)


def model_spec(name: str, num_classes: int, in_channels: int = 3) -> dict:
    """A plain JSON-able description from which :func:`build_from_spec` rebuilds the model.

    Zoo names are stored lower-cased so equal models get equal specs.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    _check_sizes(num_classes, in_channels)
    name = name.strip()
    if name.lower() in _ZOO:
        name = name.lower()
    return {"name": name, "num_classes": num_classes, "in_channels": in_channels}


def build_from_spec(spec: Any) -> nn.Module:
    """Rebuild an untrained model from a dict made by :func:`model_spec`."""
    if not isinstance(spec, dict):
        raise ModelError(f"model spec must be a dict, got {type(spec).__name__}")
    keys = {"name", "num_classes", "in_channels"}
    missing = sorted(keys - spec.keys())
    extra = sorted(str(k) for k in spec.keys() - keys)
    if missing or extra:
        raise ModelError(f"bad model spec: missing keys {missing}, unexpected keys {extra}")
    return build_model(spec["name"], spec["num_classes"], spec["in_channels"])
