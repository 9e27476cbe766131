"""Built-in models: plain ``nn.Module``s, each readable in one sitting, each checking its input shape.

All models take ``seed`` and draw their initial weights from ``torch.Generator().manual_seed(seed)`` (the global
RNG is left untouched), so the same seed gives the same weights. ``build_model("mlp:depth=3,width=64", dataset)``
builds one by name (``MODELS``), inferring input and output sizes from the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from optiscope.utils.spec import parse_spec
from optiscope.zoo.init import init_module_, parse_init, preserve_global_rng

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "linear": nn.Identity, "identity": nn.Identity, "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {minimum}")
    return value


def _check_input(model: str, x: torch.Tensor, expected: tuple[int, ...], what: str = "") -> None:
    if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
        shape = ", ".join(str(s) for s in expected)
        raise ValueError(f"{model} expected input of shape (batch, {shape}){what}, got {tuple(x.shape)}")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class _ResidualGroups:
    """Groups equal-shape layers into residual blocks of ``skip`` layers (``skip = 0``: no residuals).

    A block ``x -> act(x + F(x))`` where ``F`` applies its layers as ``layer -> [norm] -> act`` except that the last
    layer's activation is applied after the addition (ResNet convention). Layers left over at the end (when the
    count is not a multiple of ``skip``) are plain ``layer -> [norm] -> act``.
    """

    @staticmethod
    def forward(h: torch.Tensor, layers: Sequence[nn.Module], norms: Sequence[nn.Module], act: nn.Module,
                skip: int) -> torch.Tensor:
        i, n = 0, len(layers)
        while i < n:
            if skip > 0 and i + skip <= n:
                z = h
                for j in range(i, i + skip):
                    z = norms[j](layers[j](z))
                    if j < i + skip - 1:
                        z = act(z)
                h = act(h + z)
                i += skip
            else:
                h = act(norms[i](layers[i](h)))
                i += 1
        return h


# ------------------------------------------------------------------------------------------------------ MLP
class MLP(nn.Module):
    r"""Fully connected network with ``depth`` weight matrices (Orvieto et al. 2022, §4; Jiang et al. 2023 models).

    ``input_dim -> width -> ... -> width -> output_dim``: ``depth`` linear layers, ``depth - 1`` hidden layers of
    ``width`` units, ``activation`` after each hidden layer, none after the output. ``init`` is one of
    ``{lecun, xavier, he} x {uniform, normal}`` or ``torch`` (:mod:`optiscope.zoo.init`, Orvieto et al. 2022, §2; biases zero).
    ``residual = k > 0`` adds identity skips around blocks of ``k`` consecutive hidden-to-hidden layers (Orvieto et al. 2022
    App. D uses ``k = 3``); ``batchnorm=True`` puts ``BatchNorm1d`` after each hidden linear layer. Inputs of shape
    ``(batch, *input_shape)`` are flattened (``input_shape`` defaults to ``(input_dim,)``).
    """

    def __init__(self, input_dim: int, output_dim: int, depth: int = 3, width: int = 64, activation: str = "relu",
                 init: str = "he_normal", bias: bool = True, residual: int = 0, batchnorm: bool = False,
                 gain: float = 1.0, input_shape: Sequence[int] | None = None, seed: int = 0) -> None:
        super().__init__()
        _positive_int(input_dim, "input_dim"), _positive_int(output_dim, "output_dim")
        _positive_int(depth, "depth"), _positive_int(width, "width")
        _positive_int(residual, "residual", minimum=0)
        parse_init(init)
        self.input_shape = tuple(input_shape) if input_shape is not None else (input_dim,)
        if math.prod(self.input_shape) != input_dim:
            raise ValueError(f"input_shape {self.input_shape} does not hold input_dim={input_dim} features")
        self.depth, self.width, self.residual, self.init = depth, width, residual, init
        self.act = _activation(activation)
        dims = [input_dim] + [width] * (depth - 1) + [output_dim]
        gen = _generator(seed)
        with preserve_global_rng():
            self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=bias) for i in range(depth))
            self.norms = nn.ModuleList(nn.BatchNorm1d(width) if batchnorm else nn.Identity()
                                       for _ in range(depth - 1))
        for layer in self.layers:
            init_module_(layer, init, gen, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("MLP", x, self.input_shape)
        h = x.reshape(len(x), -1)
        if self.depth == 1:
            return self.layers[0](h)
        h = self.act(self.norms[0](self.layers[0](h)))
        h = _ResidualGroups.forward(h, self.layers[1:-1], self.norms[1:], self.act, self.residual)
        return self.layers[-1](h)


# ----------------------------------------------------------------------------------------- linear models
class NeuralChain(nn.Module):
    r"""Width-1 deep linear network ``f(x) = (prod_{l=1}^L w_l) x`` (Orvieto et al. 2022, §3, neural chain).

    ``depth = L`` scalar weights, each its own parameter ``weights.{l}`` (a one-element tensor, so a "layer" of
    the Hessian engine is one weight). ``init="uniform"``: ``w_l ~ U[-scale, scale]`` (default ``scale = sqrt(3)``,
    the variance-preserving choice ``E[w^2] = 1``); ``"normal"``: ``N(0, scale^2)``; ``"constant"``: every
    ``w_l = scale`` (the symmetric start of Orvieto et al. 2022, Prop. 7). Input and output shape ``(batch, 1)``.
    """

    def __init__(self, depth: int = 10, init: str = "uniform", scale: float = math.sqrt(3.0), seed: int = 0) -> None:
        super().__init__()
        _positive_int(depth, "depth")
        if init not in ("uniform", "normal", "constant"):
            raise ValueError(f"unknown NeuralChain init {init!r}; valid: uniform, normal, constant")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale)) or (init != "constant" and scale <= 0):
            raise ValueError(f"scale={scale!r} is invalid: must be finite (and > 0 for random inits)")
        gen = _generator(seed)
        if init == "uniform":
            w = (torch.rand(depth, generator=gen) * 2 - 1) * scale
        elif init == "normal":
            w = torch.randn(depth, generator=gen) * scale
        else:
            w = torch.full((depth,), float(scale))
        self.depth = depth
        self.weights = nn.ParameterList(nn.Parameter(w[i:i + 1].clone()) for i in range(depth))

    def product(self) -> torch.Tensor:
        """``prod_l w_l`` (a one-element tensor)."""
        out = self.weights[0]
        for w in self.weights[1:]:
            out = out * w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("NeuralChain", x, (1,))
        return x * self.product()


class DeepLinear(nn.Module):
    r"""Deep linear network ``f(x) = W_N ... W_1 x`` (Arora, Cohen & Hazan 2018; Arora, Cohen, Hu & Luo 2019).

    ``depth = N`` bias-free factors, ``input_dim -> width -> ... -> width -> output_dim`` (``width`` ignored for
    ``N = 1``). ``init`` as :class:`MLP` (default ``xavier_normal``, Orvieto et al. 2022's choice for linear nets); with
    ``init_scale = s`` instead every factor is i.i.d. ``N(0, (s^(1/N) / sqrt(width))^2)`` so that
    ``||W_e(0)||_F ~ s sqrt(n)`` (ACHL's ``gaussian`` init; for square ``n x n`` factors). Parameters are named
    ``factors.{j}.weight``; :meth:`end_to_end` returns ``W_e``.
    """

    def __init__(self, input_dim: int, output_dim: int, depth: int = 3, width: int = 32, init: str = "xavier_normal",
                 init_scale: float | None = None, seed: int = 0) -> None:
        super().__init__()
        _positive_int(input_dim, "input_dim"), _positive_int(output_dim, "output_dim")
        _positive_int(depth, "depth"), _positive_int(width, "width")
        parse_init(init)
        if init_scale is not None and not init_scale > 0:
            raise ValueError(f"init_scale={init_scale!r} must be > 0")
        dims = [input_dim] + [width] * (depth - 1) + [output_dim]
        gen = _generator(seed)
        with preserve_global_rng():
            self.factors = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=False) for i in range(depth))
        for f in self.factors:
            if init_scale is None:
                init_module_(f, init, gen)
            else:
                std = init_scale ** (1.0 / depth) / math.sqrt(width if depth > 1 else max(input_dim, output_dim))
                with torch.no_grad():
                    f.weight.copy_(torch.randn(f.weight.shape, generator=gen) * std)
        self.input_dim = input_dim

    def end_to_end(self) -> torch.Tensor:
        """``W_e = W_N ... W_1`` (``output_dim x input_dim``)."""
        W = self.factors[0].weight
        for f in self.factors[1:]:
            W = f.weight @ W
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("DeepLinear", x, (self.input_dim,))
        for f in self.factors:
            x = f(x)
        return x


class TwoLayerLinear(nn.Module):
    r"""Two-layer linear network ``f(x) = W2 W1 x`` with ``W1 in R^{m x d}``, ``W2 in R^{k x m}`` (Jiang et al. 2023, §5).

    Jiang et al. 2023, Assumption 2: i.i.d. Gaussian entries with a small standard deviation ``init_std`` (default ``1e-3``,
    the sanity simulation; ``None`` uses LeCun normal ``1/fan_in``). Parameters ``W1``, ``W2``.
    """

    def __init__(self, d: int, m: int = 64, k: int = 1, init_std: float | None = 1e-3, seed: int = 0) -> None:
        super().__init__()
        _positive_int(d, "d"), _positive_int(m, "m"), _positive_int(k, "k")
        if init_std is not None and not init_std > 0:
            raise ValueError(f"init_std={init_std!r} must be > 0 (or None for LeCun normal)")
        gen = _generator(seed)
        s1 = init_std if init_std is not None else 1.0 / math.sqrt(d)
        s2 = init_std if init_std is not None else 1.0 / math.sqrt(m)
        self.W1 = nn.Parameter(torch.randn(m, d, generator=gen) * s1)
        self.W2 = nn.Parameter(torch.randn(k, m, generator=gen) * s2)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("TwoLayerLinear", x, (self.d,))
        return x @ self.W1.T @ self.W2.T


class Bilinear(nn.Module):
    r"""The two-parameter model of Cattaneo et al. 2024, §4: ``f(x) = theta1 theta2 x``.

    With the data of :meth:`data` (``x = 1``, target ``y``) and :class:`optiscope.zoo.data.HalfMSELoss` the loss is
    ``E(theta) = (y - theta1 theta2)^2 / 2``; minima on the hyperbola ``theta1 theta2 = y``. One parameter
    ``theta = (theta1, theta2)``; default start ``(2.8, 3.5)`` (a numerical-check start; the paper's value is not recoverable).
    """

    def __init__(self, theta1: float = 2.8, theta2: float = 3.5, seed: int = 0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([float(theta1), float(theta2)]))

    @staticmethod
    def data(y: float = 1.5, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-sample batch ``(x = [[1]], y = [[y]])`` (``y = 3/2`` default: a guess, not printed in the paper)."""
        return torch.ones(1, 1, dtype=dtype), torch.full((1, 1), float(y), dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("Bilinear", x, (1,))
        return x * (self.theta[0] * self.theta[1])


# ----------------------------------------------------------------------------------------------- transformer
class TinyTransformer(nn.Module):
    r"""Small pre-norm Transformer encoder (``nn.TransformerEncoderLayer``): classifier or causal LM.

    Tokens are either ids (``vocab_size`` given; input ``(batch, seq_len)`` int64, ``nn.Embedding``) or feature
    vectors (``token_dim`` given; input ``(batch, seq_len, token_dim)`` or flat ``(batch, seq_len * token_dim)``,
    ``nn.Linear`` embedding; e.g. an 8x8 image as 8 row tokens). Learned positional embeddings up to ``seq_len``.
    ``causal=False``: mean-pool over positions -> ``Linear(d_model, n_outputs)``, output ``(batch, n_outputs)``.
    ``causal=True`` (LM): causal attention mask, output logits ``(batch, T, n_outputs)`` for ``T <= seq_len``.
    Dropout 0 (deterministic; the curvature layer differentiates it). Weights: PyTorch's defaults drawn under a
    seeded generator (via :func:`torch.random.fork_rng`), embeddings ``N(0, 0.02^2)``.
    """

    def __init__(self, n_outputs: int, seq_len: int, vocab_size: int | None = None, token_dim: int | None = None,
                 d_model: int = 64, n_heads: int = 4, n_layers: int = 2, dim_feedforward: int | None = None,
                 causal: bool = False, seed: int = 0) -> None:
        super().__init__()
        _positive_int(n_outputs, "n_outputs"), _positive_int(seq_len, "seq_len")
        _positive_int(d_model, "d_model"), _positive_int(n_heads, "n_heads"), _positive_int(n_layers, "n_layers")
        if (vocab_size is None) == (token_dim is None):
            raise ValueError("TinyTransformer needs exactly one of vocab_size (token ids) or token_dim (features)")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.seq_len, self.vocab_size, self.token_dim, self.causal = seq_len, vocab_size, token_dim, causal
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            if vocab_size is not None:
                self.embed = nn.Embedding(_positive_int(vocab_size, "vocab_size"), d_model)
                nn.init.normal_(self.embed.weight, std=0.02)
            else:
                self.embed = nn.Linear(_positive_int(token_dim, "token_dim"), d_model)
            self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward or 4 * d_model, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, n_outputs)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None:
            if x.ndim != 2 or x.shape[1] > self.seq_len or x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"TinyTransformer expected token ids of shape (batch, T <= {self.seq_len}) and "
                                 f"integer dtype, got {tuple(x.shape)} {x.dtype}")
            return self.embed(x)
        if x.ndim == 2 and x.shape[1] == self.seq_len * self.token_dim:
            x = x.reshape(len(x), self.seq_len, self.token_dim)
        if x.ndim != 3 or x.shape[2] != self.token_dim or x.shape[1] > self.seq_len:
            raise ValueError(f"TinyTransformer expected input of shape (batch, T <= {self.seq_len}, "
                             f"{self.token_dim}) or (batch, {self.seq_len * self.token_dim}), got {tuple(x.shape)}")
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._tokens(x)
        T = h.shape[1]
        h = h + self.pos[:T]
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype)
            h = self.encoder(h, mask=mask, is_causal=True)
            return self.head(self.norm(h))
        h = self.encoder(h)
        return self.head(self.norm(h).mean(dim=1))


# ------------------------------------------------------------------------------------------------------ CNNs
def _as_image(model: str, x: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    if x.ndim == 2 and x.shape[1] == math.prod(image_shape):
        return x.reshape(len(x), *image_shape)
    _check_input(model, x, image_shape, f" or (batch, {math.prod(image_shape)})")
    return x


class FCN(nn.Module):
    r"""Fully convolutional image-to-image network (Orvieto et al. 2022, §5).

    ``depth`` convolutions ``in_channels -> channels -> ... -> channels -> out_channels`` (default
    ``out_channels = in_channels``: the target is the input image), odd ``kernel`` ``k`` with padding
    ``(k - 1) / 2`` so the resolution never changes, ``padding_mode`` in ``zeros | circular | reflect |
    replicate`` (circular avoids the zero-padding vanishing of Orvieto et al. 2022, §5), ``activation`` after every layer but
    the last, ``init`` as :class:`MLP` with convolution fans. Optional ``residual = k`` skips around blocks of
    ``k`` hidden-to-hidden convolutions (Orvieto et al. 2022, App. D uses 3) and ``batchnorm`` (``BatchNorm2d``).
    Effective width (Orvieto et al. 2022, §5): ``channels * kernel^2``. Input ``(batch, *image_shape)`` or flattened.
    """

    def __init__(self, image_shape: Sequence[int] = (3, 32, 32), depth: int = 5, channels: int = 16, kernel: int = 3,
                 padding_mode: str = "zeros", out_channels: int | None = None, activation: str = "relu",
                 init: str = "he_normal", residual: int = 0, batchnorm: bool = False, bias: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape}")
        _positive_int(depth, "depth"), _positive_int(channels, "channels"), _positive_int(kernel, "kernel")
        if kernel % 2 == 0:
            raise ValueError(f"kernel={kernel} must be odd (padding (k-1)/2 keeps the resolution)")
        if padding_mode not in ("zeros", "circular", "reflect", "replicate"):
            raise ValueError(f"padding_mode={padding_mode!r}; valid: zeros, circular, reflect, replicate")
        _positive_int(residual, "residual", minimum=0)
        parse_init(init)
        c_in = self.image_shape[0]
        c_out = out_channels if out_channels is not None else c_in
        dims = [c_in] + [channels] * (depth - 1) + [c_out]
        self.depth, self.residual, self.effective_width = depth, residual, channels * kernel ** 2
        self.act = _activation(activation)
        gen = _generator(seed)
        with preserve_global_rng():
            self.layers = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], kernel, padding=(kernel - 1) // 2,
                                                  padding_mode=padding_mode, bias=bias) for i in range(depth))
            self.norms = nn.ModuleList(nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
                                       for _ in range(depth - 1))
        for layer in self.layers:
            init_module_(layer, init, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _as_image("FCN", x, self.image_shape)
        if self.depth == 1:
            return self.layers[0](h)
        h = self.act(self.norms[0](self.layers[0](h)))
        h = _ResidualGroups.forward(h, self.layers[1:-1], self.norms[1:], self.act, self.residual)
        return self.layers[-1](h)


class StrippedResNet(nn.Module):
    r"""ResNet-like classifier stripped of BatchNorm and residual connections (Orvieto et al. 2022, §5 "stripped_ResNet").

    A stem convolution ``in_channels -> channels[0]``, then one stage per entry of ``stages``: ``stages[i]``
    convolutions at ``channels[i]`` channels, the first of stages ``i > 0`` with stride 2 (resolution halves:
    32 -> 16 -> 8 -> 4 for CIFAR-sized input), then global average pooling and ``Linear(channels[-1],
    n_classes)``. Orvieto et al. 2022 uses 4 stages of 3 layers; ``wide=True`` doubles the channels, ``kernel`` sets the
    filter size (``big_stripped_ResNet`` uses larger filters). Flags add back what was stripped:
    ``batchnorm=True`` (``BatchNorm2d`` after every convolution) and ``residual=True`` (identity skips around
    blocks of ``residual_skip`` equal-shape convolutions inside each stage). ``init`` as :class:`MLP`
    (default ``he_normal``). Depth = ``1 + sum(stages) + 1`` weight layers.
    """

    def __init__(self, image_shape: Sequence[int] = (3, 32, 32), n_classes: int = 10,
                 stages: Sequence[int] = (3, 3, 3, 3), channels: Sequence[int] = (16, 32, 64, 128), kernel: int = 3,
                 wide: bool = False, batchnorm: bool = False, residual: bool = False, residual_skip: int = 2,
                 activation: str = "relu", init: str = "he_normal", seed: int = 0) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape}")
        stages, channels = [int(s) for s in stages], [int(c) for c in channels]
        if len(stages) != len(channels) or not stages:
            raise ValueError(f"stages {stages} and channels {channels} must be non-empty and of equal length")
        for s in stages:
            _positive_int(s, "stages entry")
        for c in channels:
            _positive_int(c, "channels entry")
        _positive_int(n_classes, "n_classes"), _positive_int(residual_skip, "residual_skip")
        if kernel % 2 == 0 or kernel < 1:
            raise ValueError(f"kernel={kernel} must be a positive odd integer")
        parse_init(init)
        if wide:
            channels = [2 * c for c in channels]
        self.skip = residual_skip if residual else 0
        self.act = _activation(activation)
        pad = (kernel - 1) // 2
        gen = _generator(seed)
        with preserve_global_rng():
            self.stem = nn.Conv2d(self.image_shape[0], channels[0], kernel, padding=pad)
            self.stem_norm = nn.BatchNorm2d(channels[0]) if batchnorm else nn.Identity()
            self.transitions = nn.ModuleList()
            self.transition_norms = nn.ModuleList()
            self.stage_layers = nn.ModuleList()
            self.stage_norms = nn.ModuleList()
            c_prev = channels[0]
            for i, (n, c) in enumerate(zip(stages, channels)):
                stride = 1 if i == 0 else 2
                self.transitions.append(nn.Conv2d(c_prev, c, kernel, stride=stride, padding=pad))
                self.transition_norms.append(nn.BatchNorm2d(c) if batchnorm else nn.Identity())
                self.stage_layers.append(nn.ModuleList(nn.Conv2d(c, c, kernel, padding=pad) for _ in range(n - 1)))
                self.stage_norms.append(nn.ModuleList(nn.BatchNorm2d(c) if batchnorm else nn.Identity()
                                                      for _ in range(n - 1)))
                c_prev = c
            self.fc = nn.Linear(c_prev, n_classes)
        for m in [self.stem, *self.transitions, *[l for s in self.stage_layers for l in s], self.fc]:
            init_module_(m, init, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _as_image("StrippedResNet", x, self.image_shape)
        h = self.act(self.stem_norm(self.stem(h)))
        for trans, tnorm, layers, norms in zip(self.transitions, self.transition_norms, self.stage_layers,
                                               self.stage_norms):
            h = self.act(tnorm(trans(h)))
            h = _ResidualGroups.forward(h, layers, norms, self.act, self.skip)
        return self.fc(h.mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    r"""The CNN of Cattaneo et al. 2024, App. H.4 (authors' code).

    Three blocks ``[conv3x3 -> ReLU -> conv3x3 -> ReLU -> maxpool2]`` with ``channels = (32, 64, 128)`` and 'same'
    padding, then ``Flatten -> Linear(., hidden=512) -> ReLU -> Linear(512, n_classes)``. Default ``init="torch"``
    (PyTorch's default, as the authors ran it), drawn from the seeded generator.
    """

    def __init__(self, image_shape: Sequence[int] = (3, 32, 32), n_classes: int = 10,
                 channels: Sequence[int] = (32, 64, 128), hidden: int = 512, init: str = "torch",
                 seed: int = 0) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape}")
        _positive_int(n_classes, "n_classes"), _positive_int(hidden, "hidden")
        parse_init(init)
        side_h, side_w = self.image_shape[1], self.image_shape[2]
        if side_h < 2 ** len(channels) or side_w < 2 ** len(channels):
            raise ValueError(f"image {self.image_shape} is too small for {len(channels)} max-pool blocks")
        gen = _generator(seed)
        blocks, c_prev = [], self.image_shape[0]
        with preserve_global_rng():
            for c in channels:
                blocks += [nn.Conv2d(c_prev, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                           nn.MaxPool2d(2)]
                c_prev = c
                side_h, side_w = side_h // 2, side_w // 2
            self.features = nn.Sequential(*blocks)
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_prev * side_h * side_w, hidden), nn.ReLU(),
                                            nn.Linear(hidden, n_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                init_module_(m, init, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(_as_image("SmallCNN", x, self.image_shape)))


# ------------------------------------------------------------------------------------------------ factory
def _image_shape_of(dataset) -> tuple[int, int, int]:
    shape = tuple(dataset.meta.get("image_shape", dataset.input_shape))
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, *shape)  # type: ignore[return-value]
    side = int(round(math.sqrt(math.prod(shape))))
    if side * side == math.prod(shape):
        return (1, side, side)
    raise ValueError(f"dataset {dataset.name!r} with input shape {dataset.input_shape} is not an image")


def _from_dataset(name: str, dataset, kw: dict[str, Any]) -> dict[str, Any]:
    """Fill the size arguments of model ``name`` from ``dataset`` (only those not given in ``kw``)."""
    if dataset is None:
        return kw
    out = dict(kw)
    task = dataset.task
    if name == "mlp":
        out.setdefault("input_dim", dataset.input_dim)
        out.setdefault("input_shape", dataset.input_shape)
        out.setdefault("output_dim", dataset.output_dim)
    elif name == "deep_linear":
        out.setdefault("input_dim", dataset.input_dim)
        out.setdefault("output_dim", dataset.output_dim)
    elif name == "two_layer_linear":
        out.setdefault("d", dataset.input_dim)
        out.setdefault("k", dataset.output_dim)
    elif name in ("transformer", "transformer_lm"):
        out.setdefault("n_outputs", dataset.output_dim)
        if task == "lm":
            out.setdefault("vocab_size", dataset.n_classes)
            out.setdefault("seq_len", dataset.input_shape[0])
        elif "vocab_size" not in out:
            c, h, w = _image_shape_of(dataset) if dataset.input_dim != dataset.input_shape[-1] else (1, 1, 0)
            if w:
                out.setdefault("seq_len", c * h)
                out.setdefault("token_dim", w)
            else:
                out.setdefault("seq_len", 1)
                out.setdefault("token_dim", dataset.input_dim)
    elif name == "fcn":
        out.setdefault("image_shape", _image_shape_of(dataset))
    elif name in ("stripped_resnet", "small_cnn"):
        out.setdefault("image_shape", _image_shape_of(dataset))
        out.setdefault("n_classes", dataset.output_dim)
    return out


def _transformer_lm(**kw: Any) -> TinyTransformer:
    kw.setdefault("causal", True)
    return TinyTransformer(**kw)


#: name -> model class (``transformer_lm`` is :class:`TinyTransformer` with ``causal=True``)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "neural_chain": NeuralChain,
    "deep_linear": DeepLinear,
    "two_layer_linear": TwoLayerLinear,
    "bilinear": Bilinear,
    "transformer": TinyTransformer,
    "transformer_lm": _transformer_lm,
    "fcn": FCN,
    "stripped_resnet": StrippedResNet,
    "small_cnn": SmallCNN,
}

_TUPLE_ARGS = {"stages", "channels", "image_shape", "input_shape"}


def build_model(spec: str | tuple[str, dict[str, Any]], dataset=None, seed: int = 0) -> nn.Module:
    """Build a zoo model from ``"mlp:depth=3,width=64"`` or ``("mlp", {...})``.

    ``dataset`` (a :class:`optiscope.zoo.data.Dataset` or a dataset name/spec) supplies input and output sizes that
    the spec does not give. ``seed`` seeds the initialisation unless the spec sets ``seed``. Unknown names or
    arguments raise ``ValueError``.
    """
    if isinstance(spec, (tuple, list)):
        name, kw = spec[0], dict(spec[1] or {})
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    else:
        name, kw = parse_spec(spec, MODELS, "model")
    from optiscope.utils.config import reject_non_finite

    reject_non_finite(kw, f"model {name!r}")
    if isinstance(dataset, str):
        from optiscope.zoo.data import load_dataset

        dataset = load_dataset(dataset)
    for k in _TUPLE_ARGS & set(kw):
        if isinstance(kw[k], list):
            kw[k] = tuple(kw[k])
    kw.setdefault("seed", seed)
    if name == "transformer" and dataset is not None and dataset.task == "lm":
        kw.setdefault("causal", True)
    kw = _from_dataset(name, dataset, kw)
    try:
        return MODELS[name](**kw)
    except TypeError as e:
        import inspect

        target = TinyTransformer if name == "transformer_lm" else MODELS[name]
        valid = [p for p in inspect.signature(target).parameters]
        raise ValueError(f"bad arguments for model {name!r}: {e}; valid: {valid}") from None
