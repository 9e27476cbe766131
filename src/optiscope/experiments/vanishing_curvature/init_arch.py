"""Architectures at initialization: residual connections + BatchNorm restore non-vanishing; fully convolutional and
stripped ResNets vanish at small resolution (Orvieto et al. 2022, §5, Fig. 6, 7, 17, 18, 19), at CPU scale.

Measured with :func:`optiscope.lab.init_check.init_check` (medians over seeds, float64, He-uniform, ReLU):

1. **MLP variants** (Fig. 17): narrow bias-free MLPs, plain vs residual skips over 3 layers vs BatchNorm vs both
   (BatchNorm in training mode, i.e. batch statistics, as at the first step of training); teacher data of Orvieto et al. 2022
   App. A.1. Gradient norm and Hessian block norms vs depth.
2. **FCN** (Fig. 6, 18): image-to-image fully convolutional nets on 8x8 digits (``sklearn`` digits, the input is the
   target, square loss), kernel 3, a fixed channel count vs channels growing with depth, zero vs circular padding.
   Effective width (Orvieto et al. 2022, §5) = ``channels * kernel^2``.
3. **Stripped ResNet** (Fig. 7, 19): 4 stages of ``k`` convolutions (stride 2 between stages) without BatchNorm and
   skips, on Fashion-MNIST resized to 16x16 (resolutions 16, 8, 4, 2), cross-entropy; and the same net with
   BatchNorm + residual connections restored.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.experiments.vanishing_curvature.init_mlp import on_device, teacher_on
from optiscope.lab.init_check import InitCheckConfig, init_check, limit_threads, model_factory
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import all_of, direction_claim
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt

MLP_VARIANTS = {"plain": {}, "residual": {"residual": 3}, "batchnorm": {"batchnorm": True},
                "residual+batchnorm": {"residual": 3, "batchnorm": True}}


@dataclass(frozen=True)
class ArchInitConfig(Config):
    """Configuration of the architecture-at-init experiment (Orvieto et al. 2022, Fig. 6, 7, 17, 19)."""

    seed: int = 0
    mlp_width: int = 8
    mlp_depths: tuple[int, ...] = (5, 8, 14, 26)
    fcn_channels: int = 2
    fcn_depths: tuple[int, ...] = (2, 4, 8, 16)
    fcn_channels_per_depth: int = 1
    resnet_blocks: tuple[int, ...] = (1, 2, 4, 8)
    resnet_channels: tuple[int, ...] = (4, 8, 8, 16)
    resolution: int = 16
    n_seeds: int = 4
    n_samples: int = 32
    n_probes: int = 3
    exact_max_dim: int = 600
    conv_hessian: bool = False
    device: str = "cpu"   # models (seeded on the CPU, then moved), data batches and Hessians

    def validate(self) -> None:
        require_device(self.device)
        require(self.mlp_width >= 1, "mlp_width", self.mlp_width, ">= 1")
        for f in ("mlp_depths", "fcn_depths", "resnet_blocks"):
            v = getattr(self, f)
            require(len(v) >= 3 and min(v) >= 1, f, v, ">= 3 positive depths")
        require(min(self.mlp_depths) >= 2, "mlp_depths", self.mlp_depths, "depths >= 2")
        require(len(self.resnet_channels) == 4 and min(self.resnet_channels) >= 1, "resnet_channels",
                self.resnet_channels, "4 positive channel counts")
        require(self.resolution >= 8 and self.resolution % 8 == 0, "resolution", self.resolution,
                "a multiple of 8 (4 stages)")
        for f in ("fcn_channels", "fcn_channels_per_depth", "n_seeds", "n_samples"):
            require(getattr(self, f) >= 1, f, getattr(self, f), ">= 1")
        require(self.n_probes >= 2, "n_probes", self.n_probes, ">= 2")


def _drop(meds: pd.Series) -> float:
    """median(deepest) / median(shallowest)."""
    return float(meds.iloc[-1] / meds.iloc[0])


def _fashion_small(n: int, resolution: int, seed: int, dtype=torch.float64):
    from optiscope.zoo.data import fashion_mnist

    ds = fashion_mnist(n_train=n, n_test=1, seed=seed, flatten=False)
    X = ds.train[0].reshape(n, 1, 28, 28).to(dtype)
    X = torch.nn.functional.interpolate(X, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return X, ds.train[1]


@register("init_arch", paper="002",
          title="Residual+BatchNorm restore non-vanishing; FCN / stripped ResNet at small resolution (Fig. 6, 7, 17)",
          config=ArchInitConfig,
          presets={"quick": ArchInitConfig(),
                   "full": ArchInitConfig(mlp_width=16, mlp_depths=(5, 8, 14, 26, 50, 98), fcn_channels=4,
                                          fcn_depths=(2, 4, 8, 16, 32), resnet_blocks=(1, 2, 4, 8, 16),
                                          resnet_channels=(16, 32, 64, 128), resolution=32, n_seeds=10,
                                          n_samples=64, exact_max_dim=2000, conv_hessian=True)})
def run(config: ArchInitConfig, store: RunStore) -> Result:
    """Gradient and Hessian-block medians vs depth for MLP variants, FCNs and stripped ResNets at init."""
    with limit_threads(1):  # many small tensors: one thread avoids oversubscription
        return _run(config, store)


def _run(config: ArchInitConfig, store: RunStore) -> Result:
    dev = experiment_device(config)
    metrics: dict = {}
    frames = []
    base = dict(seed=config.seed, n_seeds=config.n_seeds, n_samples=config.n_samples, hessian="blocks",
                n_probes=config.n_probes, exact_max_dim=config.exact_max_dim)
    # convolutional nets: Hessian block norms only when asked (full preset); the claims use gradient norms
    conv = dict(base, hessian="blocks" if config.conv_hessian else "none")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    # 1. MLP variants (Fig. 17)
    mlp = {}
    for name, extra in MLP_VARIANTS.items():
        spec = "mlp:activation=relu,bias=false" + "".join(f",{k}={v}" for k, v in extra.items())
        cfg = InitCheckConfig(depths=config.mlp_depths, widths=(config.mlp_width,), **base)
        res = init_check(on_device(model_factory(spec, init="he_uniform"), dev), cfg,
                         data=teacher_on(dev, config.n_samples), label=name, description=f"mlp {name}")
        frames.append(res.to_metrics(f"mlp/{name}"))
        med = res.medians("grad_norm", config.mlp_width)
        mlp[name] = {"grad_norm": med.to_dict(),
                     "hess_offdiag_norm": res.medians("hess_offdiag_norm", config.mlp_width).to_dict(),
                     "hess_diag_norm": res.medians("hess_diag_norm", config.mlp_width).to_dict(),
                     "grad_drop": _drop(med)}
        axes[0].semilogy(med.index, med.values, "-o", ms=3, label=name)
    axes[0].set_title(f"ReLU MLP width {config.mlp_width}, He-uniform: median ||grad||")
    metrics["mlp"] = mlp

    # 2. FCN on 8x8 digits (Fig. 6, 18)
    from optiscope.zoo.data import digits

    ds = digits(n_train=config.n_samples, seed=config.seed, flatten=False, dtype=torch.float64)
    X = ds.train[0].to(dev)
    fcn = {}
    for padding in ("zeros", "circular"):
        for mode in ("fixed", "growing"):
            key = f"{mode}/{padding}"
            records = []
            for depth in config.fcn_depths:
                ch = config.fcn_channels if mode == "fixed" else config.fcn_channels_per_depth * depth
                cfg = InitCheckConfig(depths=(depth,), widths=(ch,), **conv)
                res = init_check(on_device(model_factory(f"fcn:image_shape=[1,8,8],padding_mode={padding},bias=false",
                                                         init="he_uniform"), dev), cfg, data=(X, X), label=key,
                                 description=f"fcn {key} depth {depth}")
                frames.append(res.to_metrics(f"fcn/{key}"))
                s = res.summary(["grad_norm", "hess_diag_norm", "hess_offdiag_norm", "output_norm"])
                records += [{"depth": depth, "channels": ch, "effective_width": ch * 9, "quantity": r.quantity,
                             "median": r.median} for r in s.itertuples()]
            df = pd.DataFrame(records)
            g = df[df["quantity"] == "grad_norm"].set_index("depth")["median"]
            fcn[key] = {"records": df.to_dict(orient="records"), "grad_drop": _drop(g)}
            axes[1].semilogy(g.index, g.values, "-o" if padding == "zeros" else "--s", ms=3, label=key)
    axes[1].set_title(f"FCN on 8x8 digits (fixed: {config.fcn_channels} ch; growing: "
                      f"{config.fcn_channels_per_depth} x depth)")
    metrics["fcn"] = fcn

    # 3. stripped ResNet at small resolution (Fig. 7, 19)
    Xr, yr = (t.to(dev) for t in _fashion_small(config.n_samples, config.resolution, config.seed))
    resnet = {}
    ch = "[" + ",".join(str(c) for c in config.resnet_channels) + "]"
    for name, flags in (("stripped", ""), ("bn+residual", ",batchnorm=true,residual=true,residual_skip=2")):
        spec = f"stripped_resnet:image_shape=[1,{config.resolution},{config.resolution}],channels={ch}{flags}"

        def factory(depth: int, width: int, seed: int, spec=spec):
            from optiscope.utils.spec import parse_spec
            from optiscope.zoo.models import build_model

            _, kw = parse_spec(spec)
            kw["stages"] = (depth,) * 4
            kw["init"] = "he_uniform"
            return build_model(("stripped_resnet", kw), seed=seed).to(dev)

        cfg = InitCheckConfig(depths=config.resnet_blocks, widths=(1,), **conv)
        res = init_check(factory, cfg, data=(Xr, yr), loss_fn=torch.nn.functional.cross_entropy, label=name,
                         description=f"resnet {name}")
        frames.append(res.to_metrics(f"resnet/{name}"))
        med = res.medians("grad_norm", 1)
        layers = {k: 4 * k + 2 for k in config.resnet_blocks}
        resnet[name] = {"grad_norm": med.to_dict(), "weight_layers": layers, "grad_drop": _drop(med)}
        if config.conv_hessian:
            resnet[name]["hess_offdiag_norm"] = res.medians("hess_offdiag_norm", 1).to_dict()
            resnet[name]["hess_diag_norm"] = res.medians("hess_diag_norm", 1).to_dict()
        axes[2].semilogy([layers[k] for k in med.index], med.values, "-o", ms=3, label=name)
    axes[2].set_title(f"ResNet-like, {config.resolution}x{config.resolution} Fashion-MNIST: median ||grad||")
    metrics["stripped_resnet"] = resnet
    for ax in axes:
        ax.set_xlabel("depth (weight layers)")
        ax.legend(fontsize=7)
    store.save_figure(fig, "architectures_gradient_vs_depth")
    store.write_metrics(pd.concat(frames, ignore_index=True))

    dmin, dmax = min(config.mlp_depths), max(config.mlp_depths)
    claims = [
        Claim("mlp_res_bn", f"residual connections + BatchNorm keep the median gradient norm of a narrow ReLU MLP from "
              f"vanishing (depth {dmin} -> {dmax})",
              paper="Fig. 17: residual + BN restore non-vanishing gradients/curvature",
              measured={k: round(v["grad_drop"], 4) for k, v in mlp.items()},
              **_v(all_of([direction_claim((mlp["residual+batchnorm"]["grad_drop"],) * 2, null=0.1,
                                           direction="greater"),
                           direction_claim((mlp["residual+batchnorm"]["grad_drop"] - 10 * mlp["plain"]["grad_drop"],)
                                           * 2, null=0.0, direction="greater")],
                          ["residual+BN grad drop vs 0.1", "residual+BN drop - 10 x plain drop"]))),
        Claim("fcn_narrow_vanishes", "a narrow FCN (fixed channels) loses gradient magnitude with depth faster than one "
              "whose channels grow with depth",
              paper="Fig. 6: vanish when depth grows faster than width",
              measured={k: round(v["grad_drop"], 4) for k, v in fcn.items()},
              **_v(direction_claim((fcn["fixed/zeros"]["grad_drop"] - fcn["growing/zeros"]["grad_drop"],) * 2,
                                   null=0.0, direction="less"))),
        Claim("fcn_circular_padding", "at small resolution, circular padding vanishes less than zero padding when "
              "channels grow with depth",
              paper="Fig. 6 bottom right: circular padding circumvents the zero-padding effect",
              measured=f"growing/zeros {fcn['growing/zeros']['grad_drop']:.3g} vs growing/circular "
                       f"{fcn['growing/circular']['grad_drop']:.3g}",
              **_v(direction_claim((fcn["growing/circular"]["grad_drop"] - fcn["growing/zeros"]["grad_drop"],) * 2,
                                   null=0.0, direction="greater"))),
        Claim("stripped_resnet_vanishes", "a stripped ResNet (no BN, no skips) vanishes with depth; BN + residual "
              "does not",
              paper="Fig. 7 / 19: stripped ResNets vanish; only BN + residual together are stable",
              measured={k: round(v["grad_drop"], 4) for k, v in resnet.items()},
              **_v(all_of([direction_claim((resnet["stripped"]["grad_drop"],) * 2, null=0.1, direction="less"),
                           direction_claim((resnet["bn+residual"]["grad_drop"],) * 2, null=0.1, direction="greater")],
                          ["stripped grad drop vs 0.1", "BN+residual grad drop vs 0.1"]))),
    ]
    return Result(claims=claims, metrics=metrics)


def _v(verdict) -> dict:
    """A verdict as the ``holds``/``reason`` keyword arguments of :class:`Claim`."""
    return {"holds": verdict.holds, "reason": verdict.reason}
