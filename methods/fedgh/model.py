"""Small CNNs, one per dataset. ``forward(x, return_features=True)`` also returns the penultimate
features (FedDecorr regularises them)."""

import torch.nn as nn
import torch.nn.functional as F


class DigitsCNN(nn.Module):
    """8x8 inputs: two 3x3 convolutions, a 2x2 pool, two linear layers (~37k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x, return_features: bool = False):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        z = F.relu(self.fc1(x.flatten(1)))
        out = self.fc2(z)
        return (out, z) if return_features else out


class MnistCNN(nn.Module):
    """28x28 inputs: LeNet-like, two 5x5 convolutions with pooling, two linear layers (~80k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x, return_features: bool = False):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        z = F.relu(self.fc1(x.flatten(1)))
        out = self.fc2(z)
        return (out, z) if return_features else out


def make_model(dataset: str, num_classes: int = 10) -> nn.Module:
    if dataset == "digits":
        return DigitsCNN(num_classes)
    if dataset == "mnist":
        return MnistCNN(num_classes)
    raise ValueError(f"no model for dataset {dataset!r}")
