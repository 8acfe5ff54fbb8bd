"""The client models. ``forward(x, return_features=True)`` also returns the penultimate features
(FedDecorr regularises them).

* ``cnn`` (``--model cnn``, the default): a small CNN per dataset; for cifar10 the "simple-cnn"
  of NIID-Bench / MOON (two 5x5 convolutions with 6 and 16 channels, pooling, 120-84-10 linear
  layers).
* ``mobilenetv2`` (cifar10 only): the CIFAR variant of MobileNetV2 that FedDecorr trains
  (``bytedance/FedDecorr networks/mobilenetv2.py``): stride 1 in the stem and the second stage
  (32x32 inputs keep their resolution longer), ReLU, and in every stride-1 block a residual
  connection, through a 1x1 convolution + BatchNorm when the width changes. The BatchNorm
  statistics are buffers: the server averages them plainly (server.py).
"""

from typing import Tuple

import torch.nn as nn
import torch.nn.functional as F

MODELS = ("cnn", "mobilenetv2")


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


class CifarCNN(nn.Module):
    """32x32 RGB inputs: NIID-Bench's simple CNN, two 5x5 convolutions (6, 16 channels) each with
    2x2 max pooling, then 400-120-84-classes linear layers (~62k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x, return_features: bool = False):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        z = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        out = self.fc3(z)
        return (out, z) if return_features else out


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise (stride), 1x1 projection, each with
    BatchNorm (ReLU after the first two); at stride 1 the input is added back, through a 1x1
    convolution + BatchNorm when the width changes."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        mid = expansion * cin
        self.stride = stride
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = None
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        if self.stride != 1:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for 32x32 inputs (FedDecorr's CIFAR variant, ~2.3M parameters for 10 classes):
    a 3x3 stem (32 channels, stride 1), the seven stages below, a 1x1 convolution to 1280
    channels, global average pooling, a linear classifier."""

    # (expansion, output channels, blocks, stride of the first block)
    STAGES: Tuple[Tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),  # stride 2 in the ImageNet network
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)
        )
        blocks, cin = [], 32
        for expansion, cout, n, stride in self.STAGES:
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, expansion, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x, return_features: bool = False):
        z = self.head(self.blocks(self.stem(x))).mean((2, 3))
        out = self.classifier(z)
        return (out, z) if return_features else out


def make_model(dataset: str, num_classes: int = 10, arch: str = "cnn") -> nn.Module:
    """The client model of `dataset`: ``arch`` "cnn" (the dataset's small CNN) or "mobilenetv2"
    (3-channel 32x32 images: cifar10)."""
    if arch not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {arch!r}")
    if arch == "mobilenetv2":
        if dataset != "cifar10":
            raise ValueError(f"--model mobilenetv2 takes 3-channel 32x32 images (--dataset cifar10), not {dataset}")
        return MobileNetV2Cifar(num_classes)
    if dataset == "digits":
        return DigitsCNN(num_classes)
    if dataset == "mnist":
        return MnistCNN(num_classes)
    if dataset == "cifar10":
        return CifarCNN(num_classes)
    raise ValueError(f"no model for dataset {dataset!r}")
