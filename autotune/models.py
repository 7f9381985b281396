"""Any model's kernel problems: load a model by name and list what one training step dispatches.

`autotune search model torchvision:resnet18 --shape 3x224x224 --batch 1` names a model as
`torchvision:<name>` (built with random weights: nothing is downloaded), `lenet` (LeNet-5 on
1x28x28), or `package.module:factory` for a user's own (the module is imported and `factory()`
called, as `python -c` would: name only code you trust). One forward pass with hooks then
collects every conv2d/linear/max-pool problem, forward and gradients (autotune.nn.layer_calls);
after the search, each layer is checked as training calls it (autotune.layer_check).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from autotune.errors import AutotuneError, ShapeError
from autotune.problem import Problem, parse_dims

if TYPE_CHECKING:
    from autotune.nn import LayerCall

LENET_INPUT = (1, 28, 28)


def load_model(spec: str) -> nn.Module:
    """`lenet`, `torchvision:<name>` or `package.module:factory` -> a model in training mode."""
    if spec == "lenet":
        from autotune.lenet import LeNet5

        return LeNet5()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AutotuneError(f"model {spec!r}: name it as lenet, torchvision:<name> (e.g. torchvision:resnet18) "
                            "or package.module:factory")
    if module_name == "torchvision":
        module_name = "torchvision.models"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AutotuneError(f"model {spec!r}: cannot import {module_name}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AutotuneError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    model = factory()  # torchvision builders default to random weights: no download
    if not isinstance(model, nn.Module):
        raise AutotuneError(f"model {spec!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model.train()


def example_input(shape: str | None, batch: int, spec: str, dtype: torch.dtype) -> torch.Tensor:
    """A random input batch: --shape CxHxW (LeNet's 1x28x28 when the model is lenet)."""
    if batch <= 0:
        raise ShapeError(f"--batch must be positive, got {batch}")
    if shape is None:
        if spec != "lenet":
            raise ShapeError(f"model {spec} needs --shape CxHxW (the input of one sample, e.g. 3x224x224)")
        dims = LENET_INPUT
    else:
        dims = parse_dims(shape, "model input shape", (3,))
    return torch.randn(batch, *dims, dtype=dtype)


def model_layers(model: nn.Module, example: torch.Tensor) -> list[LayerCall]:
    """Every distinct conv2d/linear/max-pool call one training step of `model` on `example` makes."""
    from autotune.nn import layer_calls

    model = model.to(example.dtype)
    try:
        calls = layer_calls(model, example)
    except (RuntimeError, ValueError) as exc:  # a shape the model cannot take, a conv we cannot run
        raise ShapeError(f"the model cannot run on input {tuple(example.shape)}: {str(exc).splitlines()[0]}") from None
    if not calls:
        raise AutotuneError("the model has no nn.Conv2d or nn.Linear layer to tune")
    return calls


def model_problems(model: nn.Module, example: torch.Tensor) -> list[Problem]:
    """Every distinct problem one training step of `model` on `example` dispatches."""
    from autotune.nn import problems_of

    return problems_of(model_layers(model, example))
