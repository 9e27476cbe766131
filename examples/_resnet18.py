"""ResNet-18 built locally with exactly torchvision's architecture (``torchvision.models.resnet18``, He et al. 2016):
a 7x7/2 stem, 3x3/2 max-pool, four stages of two BasicBlocks (64, 128, 256, 512 channels; a 1x1/2 projection where
the shape changes), global average pooling and a linear head. Used by the examples when torchvision cannot be
imported (it needs a build matching the installed torch); ``width`` scales the channels for smoke tests."""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between and an identity (or 1x1/stride projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (module docstring); ``width`` = channels of the first stage (64)."""

    def __init__(self, num_classes: int = 1000, width: int = 64):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, c in enumerate(w):
            layers.append(nn.Sequential(BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[-1], num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        """Logits of a batch of 3-channel images."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 1000, width: int = 64) -> tuple[nn.Module, str]:
    """torchvision's ``resnet18(weights=None)`` when it imports (and ``width == 64``), else the local copy; returns
    ``(model, source)``."""
    if width == 64:
        try:
            from torchvision.models import resnet18 as tv_resnet18

            return tv_resnet18(weights=None, num_classes=num_classes), "torchvision"
        except Exception:  # torchvision missing, or built for another torch
            pass
    return ResNet18(num_classes, width), "local (torchvision's architecture)"
