"""The classifiers: an MLP for tabular features (Yeast), a small CNN for digit mosaics, and a
linear or MLP head on image features (VOC 2012 / COCO 2014). All end in a linear head of C logits
(``model.head``, the reference's ``linear_classifier``)."""

from __future__ import annotations

import torch.nn as nn

DROPOUT = 0.2  # the MLP's dropout (TrainConfig.dropout, --dropout)


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, dropout: float = DROPOUT):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


class LinearHead(nn.Module):
    """The reference's classifier on fixed features (``linear_fixed_features``): one linear layer;
    ``backbone`` is the identity (no parameters)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.backbone = nn.Identity()
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.head(x)


class MosaicCNN(nn.Module):
    """conv-bn-relu x 2 and a pool per stage (3 stages), global average pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 32, in_channels: int = 1):
        super().__init__()

        def stage(cin, cout):
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]

        self.backbone = nn.Sequential(
            *stage(in_channels, width),
            nn.MaxPool2d(2),
            *stage(width, 2 * width),
            nn.MaxPool2d(2),
            *stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


# the CNN's width per dataset (cmnist: 16, so that the 3 x 13 fine-tuning runs of its acceptance
# fit the 2-core budget; its pretrained backbone has the same width)
WIDTH = {"cmnist": 16}


FEATURE_DATASETS = ("voc2012", "coco2014")
HEADS = ("linear", "mlp")


def build_model(
    dataset: str, in_shape, num_classes: int, dropout: float = DROPOUT, head: str = "linear", hidden: int = 256
) -> nn.Module:
    """The MLP (yeast, with ``dropout``), the CNN (the mosaics: batch norm, no dropout), or on image
    features (voc2012, coco2014) the ``head``: ``linear`` or an ``mlp`` of width ``hidden``."""
    if dataset in FEATURE_DATASETS:
        if head not in HEADS:
            raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
        if head == "linear":
            return LinearHead(in_shape[0], num_classes)
        return MLP(in_shape[0], num_classes, hidden=hidden, dropout=dropout)
    if dataset == "yeast":
        return MLP(in_shape[0], num_classes, hidden=hidden, dropout=dropout)
    return MosaicCNN(num_classes, width=WIDTH.get(dataset, 32), in_channels=in_shape[0])
