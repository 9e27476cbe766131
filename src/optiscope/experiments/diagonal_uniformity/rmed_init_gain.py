"""Smoothness and condition number of a transformer layer's Hessian under a large initialisation gain (Jiang, Malik,
Li 2023, §3.1).

"We initialized a transformer model with default initialization in Pytorch but chose a large gain [the gain of e.g.
``torch.nn.init.xavier_uniform_``], and computed the smoothness parameter and the condition number of loss Hessian
on one layer. We observed that setting the gain as a large constant (e.g. 800) results in extremely large [values]",
which makes global worst-case convergence bounds vacuous. The paper's numbers are not in its recoverable text.

Here: a causal transformer language model on byte-level ``fortunes`` (its Hessian on ``probe_size`` sequences,
float64): ``arch = "post_norm"`` (default) is the layout of the PyTorch tutorial model the paper names
(:class:`PostNormLM`: embedding times sqrt(d_model), sinusoidal positions, post-norm ReLU encoder layers, linear
decoder, no final LayerNorm), ``"pre_norm"`` the zoo's ``TinyTransformer`` (pre-norm GELU layers, final LayerNorm).
Every weight matrix except the embeddings is re-drawn by Xavier uniform or normal with gain ``base_gain`` (PyTorch's
default 1) or ``large_gain`` (800), ``repeats`` independent draws. For every weight matrix whose Hessian block
:math:`H_{\\ell\\ell}` has at most ``max_dim`` entries, the exact block (one HVP per entry) gives the smoothness
:math:`\\lambda_{\\max}` and the condition number :math:`\\lambda_{\\max} / \\lambda_{\\min}^{+}` (smallest eigenvalue
above ``pos_tol`` x the largest; ``_extra.layer_block_spectrum``). ``extra_gains`` adds points to the figure only.

Claims, per init distribution: the median over layers of :math:`\\log_{10}(\\text{value at large gain} / \\text{value
at base gain})` (same draw seed) has a Student-t 95% CI above :math:`\\log_{10}` ``huge_factor`` (default 100: "huge"
read as at least two orders of magnitude; a judging rule, not a number from the paper). Negative control: two
independent draws at the base gain must not differ by a "huge" factor: the CI of the median over layers of
:math:`|\\log_{10}` ratio| lies below ``log10(huge_factor) / 2``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.experiments.diagonal_uniformity import _extra as x
from optiscope.metrics.verdicts import direction_claim, mean_ci
from optiscope.utils.config import Config, require
from optiscope.utils.progress import progress_task

QUANTITIES = ("top", "condition")
ARCHS = ("post_norm", "pre_norm")


class PostNormLM(torch.nn.Module):
    """The layout of the PyTorch transformer tutorial's language model (Jiang et al. 2023, §3.1 and App. A.1 name it):
    ``embed(x) * sqrt(d_model)`` plus sinusoidal positions, ``n_layers`` post-norm ``nn.TransformerEncoderLayer``
    (ReLU, feed-forward ``4 d_model``, dropout 0) under a causal mask, and a linear decoder ``head`` (no final
    LayerNorm). Embedding and decoder weights ``U[-0.1, 0.1]``, decoder bias 0 (the tutorial's ``init_weights``),
    the rest PyTorch's defaults, all drawn under ``torch.manual_seed(seed)`` in a forked RNG. Output: logits
    ``(batch, T, vocab)``."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, n_heads: int, n_layers: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.embed = torch.nn.Embedding(vocab, d_model)
            layer = torch.nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
            self.head = torch.nn.Linear(d_model, vocab)
            torch.nn.init.uniform_(self.embed.weight, -0.1, 0.1)
            torch.nn.init.uniform_(self.head.weight, -0.1, 0.1)
            torch.nn.init.zeros_(self.head.bias)
        pos = torch.arange(seq_len, dtype=torch.float64)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(seq_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
        self.register_buffer("pe", pe.float())
        self.d_model = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every next token: ``(batch, T) -> (batch, T, vocab)``."""
        T = x.shape[1]
        h = self.embed(x) * math.sqrt(self.d_model) + self.pe[:T].to(self.embed.weight.dtype)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype, device=h.device)
        return self.head(self.encoder(h, mask=mask, is_causal=True))


@dataclass(frozen=True)
class InitGainConfig(Config):
    """Model, data, gains, init distributions and judging rule of the §3.1 check (see the module docstring)."""

    seed: int = 0
    arch: str = "post_norm"
    seq_len: int = 16
    probe_size: int = 32
    d_model: int = 16
    n_heads: int = 2
    n_layers: int = 1
    base_gain: float = 1.0
    large_gain: float = 800.0
    extra_gains: tuple[float, ...] = ()
    dists: tuple[str, ...] = ("uniform", "normal")
    layers: tuple[str, ...] = ()     # empty: every re-drawn weight matrix with at most max_dim entries
    repeats: int = 3
    huge_factor: float = 100.0
    pos_tol: float = 1e-9
    max_dim: int = 1100
    device: str = "cpu"

    def validate(self) -> None:
        require(self.arch in ARCHS, "arch", self.arch, f"one of {ARCHS}")
        for f in ("seq_len", "probe_size", "d_model", "n_heads", "n_layers", "max_dim"):
            require(getattr(self, f) >= 1, f, getattr(self, f), ">= 1")
        require(self.d_model % self.n_heads == 0, "d_model", self.d_model, f"a multiple of n_heads={self.n_heads}")
        for f in ("base_gain", "large_gain"):
            require(math.isfinite(getattr(self, f)) and getattr(self, f) > 0, f, getattr(self, f), "> 0")
        require(self.large_gain > self.base_gain, "large_gain", self.large_gain, f"> base_gain = {self.base_gain}")
        require(all(g > 0 for g in self.extra_gains), "extra_gains", self.extra_gains, "positive gains")
        require(len(self.dists) >= 1 and all(d in x.INIT_DISTS for d in self.dists), "dists", self.dists,
                f"a non-empty subset of {x.INIT_DISTS}")
        require(self.repeats >= 2, "repeats", self.repeats, ">= 2 (a CI over init draws)")
        require(self.huge_factor > 1, "huge_factor", self.huge_factor, "> 1")
        require(0 < self.pos_tol < 1, "pos_tol", self.pos_tol, "in (0, 1)")
        require_device(self.device)


QUICK = InitGainConfig(d_model=8, n_heads=2, repeats=3)
MEDIUM = InitGainConfig(d_model=16, n_heads=2, extra_gains=(10.0, 100.0), repeats=6)
FULL = InitGainConfig(d_model=64, n_heads=4, n_layers=2, seq_len=64, probe_size=256, extra_gains=(10.0, 100.0),
                      repeats=10, max_dim=20000, device="auto")


def build(cfg: InitGainConfig, dist: str, gain: float, draw: int):
    """``(model, loss_fn, batch, re-drawn names)``: the float64 model of ``cfg.arch`` (causal LM) with its weight
    matrices re-drawn by :func:`_extra.reinit_weights_` (seed ``draw``), and the first ``probe_size`` training
    sequences of ``fortunes`` on ``cfg.device``."""
    from optiscope.zoo.data import default_loss, fortunes
    from optiscope.zoo.models import TinyTransformer

    ds = fortunes(seq_len=cfg.seq_len, n_train=cfg.probe_size, n_test=16, seed=cfg.seed)
    if cfg.arch == "pre_norm":
        model = TinyTransformer(n_outputs=ds.n_classes, seq_len=cfg.seq_len, vocab_size=256, d_model=cfg.d_model,
                                n_heads=cfg.n_heads, n_layers=cfg.n_layers, causal=True, seed=cfg.seed + draw)
    else:
        model = PostNormLM(ds.n_classes, cfg.seq_len, cfg.d_model, cfg.n_heads, cfg.n_layers, seed=cfg.seed + draw)
    names = x.reinit_weights_(model, dist, gain, seed=1_000 * cfg.seed + draw)
    dev = experiment_device(cfg)
    X, y = ds.train
    return model.double().to(dev), default_loss(ds), (X.to(dev), y.to(dev)), names


def measure(cfg: InitGainConfig) -> pd.DataFrame:
    """One row per (dist, gain, draw, layer): the block's ``top``, ``min_positive``, ``condition``, ``n_below``,
    ``bottom``, its size and the loss at initialisation."""
    import torch

    gains = sorted({cfg.base_gain, cfg.large_gain, *cfg.extra_gains})
    rows = []
    with progress_task("rmed_init_gain", total=len(cfg.dists) * len(gains) * (cfg.repeats + 1)) as bar:
        for dist in cfg.dists:
            for gain in gains:
                # draws 0..R-1; draw R is the control's second draw at the base gain
                for draw in range(cfg.repeats + (1 if gain == cfg.base_gain else 0)):
                    model, loss_fn, batch, names = build(cfg, dist, gain, draw)
                    sizes = {n: p.numel() for n, p in model.named_parameters()}
                    chosen = list(cfg.layers) or [n for n in names if sizes[n] <= cfg.max_dim]
                    unknown = [n for n in chosen if n not in sizes]
                    if unknown:
                        raise ValueError(f"layers {unknown} are not parameters of the model; valid: {list(sizes)}")
                    with torch.no_grad():
                        loss = float(loss_fn(model(batch[0]), batch[1]))
                    for n in chosen:
                        s = x.layer_block_spectrum(model, loss_fn, batch, n, tol=cfg.pos_tol, max_dim=cfg.max_dim)
                        rows.append({"dist": dist, "gain": gain, "draw": draw, "layer": n, "loss": loss,
                                     "top": s.top, "min_positive": s.min_positive, "condition": s.condition,
                                     "n_below": s.n_below, "bottom": s.bottom, "size": s.n})
                    bar.advance()
                if gain != cfg.base_gain:
                    bar.advance()
    return pd.DataFrame(rows)


def per_draw_log_ratio(df: pd.DataFrame, dist: str, q: str, gain_a: float, gain_b: float,
                       draws_a: list[int], draws_b: list[int], absolute: bool = False) -> np.ndarray:
    """For each pair ``(draws_a[k], draws_b[k])``: the median over layers of ``log10(q(gain_a, draw_a) / q(gain_b,
    draw_b))`` (``|.|`` first with ``absolute``); NaN where a layer's value is missing or not positive."""
    d = df[df["dist"] == dist].set_index(["gain", "draw", "layer"])[q]
    layers = sorted(df[df["dist"] == dist]["layer"].unique())
    out = []
    for da, db in zip(draws_a, draws_b):
        v = []
        for lname in layers:
            a, b = d.get((gain_a, da, lname), np.nan), d.get((gain_b, db, lname), np.nan)
            v.append(math.log10(a / b) if (np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0) else np.nan)
        v = np.abs(v) if absolute else np.asarray(v)
        out.append(float(np.median(v)) if np.isfinite(v).all() and len(v) else np.nan)
    return np.asarray(out, float)


def gain_claims(df: pd.DataFrame, cfg: InitGainConfig) -> list[Claim]:
    """Per init distribution: smoothness and condition number huge at the large gain (direction claims on the
    per-draw median log ratio against ``log10(huge_factor)``) and the same-gain control (upper CI bound of the
    per-draw median |log10 ratio| below ``log10(huge) / 2``)."""
    thr = math.log10(cfg.huge_factor)
    R = cfg.repeats
    claims = []
    for dist in cfg.dists:
        sub = df[df["dist"] == dist]
        n_layers = int(sub["layer"].nunique())
        premises = [(n_layers >= 1, "no layer block small enough to be measured exactly (raise max_dim)")]
        for q, what in (("top", "smoothness (largest eigenvalue)"), ("condition", ("condition number (largest / "
                                                                                   "smallest positive eigenvalue)"))):
            lr = per_draw_log_ratio(df, dist, q, cfg.large_gain, cfg.base_gain, list(range(R)), list(range(R)))
            m, lo, hi = mean_ci(lr)
            big = sub[sub["gain"] == cfg.large_gain][q]
            claims.append(Claim.judged(
                f"{q}_huge_{dist}", f"{dist} Xavier init: the {what} of a layer's Hessian block at gain "
                f"{cfg.large_gain:g} is at least {cfg.huge_factor:g}x that at gain {cfg.base_gain:g} (median over "
                f"{n_layers} layers of log10 ratio, Student-t 95% CI over {R} draws > {thr:g})",
                "extremely large smoothness and condition number at gain 800 (§3.1)",
                {"median_log10_ratio_mean": x.jsonable(m), "ci95": [x.jsonable(lo), x.jsonable(hi)],
                 "threshold_log10": thr, f"median_{q}_large_gain": x.jsonable(big.median()) if len(big) else None,
                 f"median_{q}_base_gain": x.jsonable(sub[sub["gain"] == cfg.base_gain][q].median())
                 if len(sub) else None, "draws": int(np.isfinite(lr).sum())},
                direction_claim((lo, hi), null=thr, estimate=m, premises=premises)))
        ctrl = per_draw_log_ratio(df, dist, "top", cfg.base_gain, cfg.base_gain, list(range(R)),
                                  list(range(1, R + 1)), absolute=True)
        m, lo, hi = mean_ci(ctrl)
        claims.append(Claim.judged(
            f"control_same_gain_not_huge_{dist}", f"negative control ({dist}): two independent draws at gain "
            f"{cfg.base_gain:g} differ in smoothness by far less than the 'huge' factor: the CI of the median over "
            f"layers of |log10 ratio| (Student-t 95%) lies below {thr / 2:g}",
            "the factor is due to the gain, not to the draw",
            {"median_abs_log10_ratio_mean": x.jsonable(m), "ci95": [x.jsonable(lo), x.jsonable(hi)],
             "threshold_log10": thr / 2, "pairs": int(np.isfinite(ctrl).sum())},
            direction_claim((lo, hi), null=thr / 2, direction="less", estimate=m, premises=premises)))
    return claims


@register("rmed_init_gain", paper="000", title="Smoothness and condition number of a transformer layer's Hessian "
          "block at init gain 800 vs the default gain, §3.1", config=InitGainConfig,
          presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: InitGainConfig, store) -> Result:
    """Jiang et al. 2023, §3.1: exact layer-block spectra of the Hessian at a large vs the default init gain."""
    cfg = config
    t0 = time.perf_counter()
    df = measure(cfg)
    claims = gain_claims(df, cfg)
    store.write_metrics(df.melt(id_vars=["dist", "gain", "draw", "layer"], value_vars=["top", "condition", "loss"],
                                var_name="metric").assign(run=lambda d: d["dist"] + "/g" + d["gain"].astype(str)
                                                          + "/d" + d["draw"].astype(str), step=0, optimizer="none"))
    _figure(store, df)
    table = (df.groupby(["dist", "gain", "layer"])[["top", "bottom", "condition", "n_below", "loss"]].median()
             .reset_index())
    return Result(claims=claims, metrics={
        "per_layer_median_over_draws": table.to_dict(orient="records"), "gains": sorted(df["gain"].unique().tolist()),
        "layers": sorted(df["layer"].unique().tolist()), "seconds": time.perf_counter() - t0})


def _figure(store, df: pd.DataFrame) -> None:
    from optiscope.utils.plotting import plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, q in zip(axes, QUANTITIES):
        for (dist, layer), g in df.groupby(["dist", "layer"]):
            m = g.groupby("gain")[q].median()
            ax.plot(m.index, m.values, marker="o" if dist == "uniform" else "s", ms=3,
                    label=f"{dist} {layer.replace('encoder.layers.', 'L')}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("init gain")
        ax.set_title("largest eigenvalue" if q == "top" else "condition number", fontsize=9)
    axes[0].legend(fontsize=5)
    fig.tight_layout()
    store.save_figure(fig, "spectrum_vs_gain")
