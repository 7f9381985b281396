"""LeNet-5, the seed chapter's network, and the kernel problems one training step runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autotune.problem import Problem


class LeNet5(nn.Module):
    """conv 6@5×5 (pad 2) → ReLU → max-pool 2 → conv 16@5×5 → ReLU → max-pool 2 → fc 120 → fc 84 → fc 10.

    For 28×28 grayscale input (MNIST, Fashion-MNIST). The seed's listing defined fc2 twice and
    never fc3; here the three fully connected layers are fc1, fc2, fc3.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        # Modules rather than F.max_pool2d calls, so autotune.patch can tune them too (no
        # parameters: the state_dict is the same).
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


def lenet_problems(batch: int = 64, dtype: torch.dtype = torch.float32) -> list[Problem]:
    """The 18 problems of one LeNet training step at this batch size: forward, grad weight and
    (except conv1, whose input is data) grad input of every conv and linear layer, and forward
    and gradient of both max-pools."""
    from autotune.nn import layer_problems

    model = LeNet5().to(dtype)
    return layer_problems(model, torch.zeros(batch, 1, 28, 28, dtype=dtype))
