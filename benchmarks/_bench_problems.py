"""The four side-by-side benchmark problems (MLP, small CNN, 4-layer transformer, BatchNorm ResNet in train mode).

Every activation is smooth (tanh, GELU, softplus) so that central finite differences are a valid reference
(with ReLU, h = 1e-4 crosses kinks). ``build(name, device, dtype)`` returns a :class:`BenchProblem`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NAMES = ("mlp", "cnn", "transformer", "resnet_bn")


@dataclass
class BenchProblem:
    """One benchmark problem: a model, a mean loss, one batch, and a one-line description."""
    name: str
    model: nn.Module
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    X: torch.Tensor
    y: torch.Tensor
    description: str

    def loss(self, model: nn.Module | None = None) -> torch.Tensor:
        """The mean loss of ``model`` (default: the problem's own) on the batch, attention on the MATH backend."""
        with math_sdpa():
            return self.loss_fn((model or self.model)(self.X), self.y)


def math_sdpa() -> contextlib.AbstractContextManager:
    """Scaled-dot-product attention on the twice-differentiable MATH backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def seq_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy for ``[B, T, V]`` logits and ``[B, T]`` targets."""
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class Encoder(nn.Module):
    """Embedding + ``n_layers`` ``TransformerEncoderLayer`` (GELU, no dropout) + linear head."""

    def __init__(self, vocab: int = 64, d_model: int = 64, n_layers: int = 4, heads: int = 4, ff: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)))


class Block(nn.Module):
    """Residual block ``x + BN(conv(softplus(BN(conv(x)))))`` followed by softplus."""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.Softplus()

    def forward(self, x):
        return self.act(x + self.b2(self.c2(self.act(self.b1(self.c1(x))))))


class ResNetBN(nn.Module):
    """Stem conv-BN, two residual blocks at 16 channels, a stride-2 conv, one block at 32, pooling, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Softplus())
        self.stage1 = nn.Sequential(Block(16), Block(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.Softplus())
        self.stage2 = Block(32)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))))


def build(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BenchProblem:
    """The problem ``name`` (one of :data:`NAMES`) with fixed seeds, on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ce = nn.CrossEntropyLoss()
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
        X, y = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
        desc, loss = "MLP 64-256-256-10 (tanh), batch 512", ce
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
                              nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.AvgPool2d(2), nn.Flatten(),
                              nn.Linear(16 * 7 * 7, 10))
        X, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
        desc, loss = "small CNN (2 conv + GELU + avg-pool, linear), 28x28, batch 128", ce
    elif name == "transformer":
        model = Encoder().eval()
        X, y = torch.randint(0, 64, (64, 32), generator=g), torch.randint(0, 64, (64, 32), generator=g)
        desc, loss = "4-layer transformer encoder, d_model=64, 4 heads, ff 128, GELU, 64x32 tokens", seq_ce
    elif name == "resnet_bn":
        model = ResNetBN().train()
        X, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        desc, loss = "BatchNorm ResNet (3 residual blocks, softplus), train mode, 32x32x3, batch 64", ce
    else:
        raise ValueError(f"unknown problem {name!r}; known: {NAMES}")
    model = model.to(device=device, dtype=dtype)
    X = X.to(device) if not X.is_floating_point() else X.to(device=device, dtype=dtype)
    return BenchProblem(name, model, loss, X, y.to(device), desc)
