"""kernel-autotune: tune conv and GEMM kernels on the machine at hand, cache the winners per
shape, and pick them per layer at run time.

    import autotune
    y = autotune.conv2d(x, w, b, stride=1, padding=2)   # autograd-enabled, dispatched per shape
    entry = autotune.search(autotune.parse_problem("conv2d", "3x32x32"))  # cached, or tune + store
    model = autotune.patch(model)                        # nn.Conv2d / Linear / MaxPool2d -> tuned modules
    opt = autotune.flat_optimizer(model.parameters(), torch.optim.Adadelta, lr=1.0)  # one flat buffer
    with autotune.policy("benchmark"):                   # like cudnn.benchmark, but persistent
        train(model)

Importing autotune does not import optuna: `autotune.tune` loads it on first use.
Kernel modules (ours in kernels/, or your own) list `autotune.KernelSpec`s; see autotune/registry.py.
"""

from autotune.cache import Cache
from autotune.decision import search
from autotune.dispatch import chosen, get_policy, policy, reset, select, set_policy, stats, uncached
from autotune.entry import Entry
from autotune.errors import AutotuneError
from autotune.flat_params import flat_optimizer
from autotune.lenet import LeNet5, lenet_problems
from autotune.nn import Conv2d, Linear, MaxPool2d, conv2d, linear, max_pool2d, patch
from autotune.problem import Conv2dProblem, GemmProblem, Pool2dProblem, parse_problem
from autotune.progress import bar as progress_bar
from autotune.registry import KernelSpec

__version__ = "0.1.0"

__all__ = [
    "AutotuneError",
    "Cache",
    "Conv2d",
    "Conv2dProblem",
    "Entry",
    "GemmProblem",
    "KernelSpec",
    "LeNet5",
    "Linear",
    "MaxPool2d",
    "Pool2dProblem",
    "chosen",
    "conv2d",
    "flat_optimizer",
    "get_policy",
    "max_pool2d",
    "lenet_problems",
    "linear",
    "parse_problem",
    "patch",
    "policy",
    "progress_bar",
    "reset",
    "search",
    "select",
    "set_policy",
    "stats",
    "uncached",
    "tune",
]


def __getattr__(name: str):
    # tune() needs optuna, which is heavy; load it only when asked for.
    if name == "tune":
        from autotune.tuner import tune

        return tune
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
