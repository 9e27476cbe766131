"""``CompareConfig``: the frozen config behind ``optiscope compare`` / ``resume`` / ``demo``, and its runner.

A comparison directory's ``config.yaml`` is a ``CompareConfig`` (plus ``kind: compare``), so ``optiscope resume DIR``
can rebuild the identical problem and continue every run from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from optiscope.lab.probes import make_probes
from optiscope.lab.problem import Problem
from optiscope.lab.run import CompareResult, compare, lr_factor_fn, optimizer_label
from optiscope.lab.store import RunStore
from optiscope.utils.config import Config, ConfigError, require
from optiscope.utils.spec import SpecError, parse_spec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class CompareConfig(Config):
    """Optimizers from one initial model on one zoo problem, with probes (Jiang et al. 2023, §4 method)."""

    model: str = "mlp:depth=3,width=64"
    data: str = "digits"
    optimizers: tuple[str, ...] = ("sgdm:lr=0.1,momentum=0.9", "adam:lr=1e-3")
    names: tuple[str, ...] = ()
    steps: int = 500
    batch_size: int = 128
    probe_every: int = 50
    probe_steps: tuple[int, ...] = ()
    probes: tuple[str, ...] = ("loss", "r_med", "sharpness")
    seed: int = 0
    data_seed: int | None = None
    lr_schedule: str | None = None
    full_batch: bool = False
    accumulation_chunks: int | None = None
    probe_size: int = 1024
    dtype: Literal["float32", "float64"] = "float32"

    def validate(self) -> None:
        require(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.probe_every >= 0, "probe_every", self.probe_every, ">= 0 (0: first and last step only)")
        require(self.probe_size >= 1, "probe_size", self.probe_size, ">= 1")
        require(len(self.optimizers) >= 1, "optimizers", self.optimizers, "at least one optimizer spec")
        require(all(0 <= s <= self.steps for s in self.probe_steps), "probe_steps", self.probe_steps,
                f"steps within [0, {self.steps}]")
        require(self.accumulation_chunks is None or self.accumulation_chunks >= 1, "accumulation_chunks",
                self.accumulation_chunks, "none or an integer >= 1")
        require(not self.names or len(self.names) == len(self.optimizers), "names", self.names,
                f"empty or one name per optimizer ({len(self.optimizers)})")
        require(len(set(self.names)) == len(self.names), "names", self.names, "distinct names")
        from optiscope.optim import OPTIMIZERS

        for spec in self.optimizers:
            try:
                parse_spec(spec, OPTIMIZERS, "optimizer")
            except SpecError as e:
                raise ConfigError(f"field 'optimizers': {e}") from None
        try:
            make_probes(list(self.probes))
        except ValueError as e:
            raise ConfigError(f"field 'probes': {e}") from None
        try:
            lr_factor_fn(self.lr_schedule, self.steps)
        except ValueError as e:
            raise ConfigError(f"field 'lr_schedule': {e}") from None
        _check_zoo_names(self.model, self.data)

    def run_names(self) -> list[str]:
        """Explicit ``names``, else the optimizer names, disambiguated with their full spec when repeated."""
        if self.names:
            return list(self.names)
        labels = [optimizer_label(s) for s in self.optimizers]
        return [lab if labels.count(lab) == 1 else s.replace(" ", "") for lab, s in zip(labels, self.optimizers)]


def _check_zoo_names(model: str, data: str) -> None:
    """Unknown model/dataset names -> ConfigError listing the valid ones (skipped if the zoo is not importable)."""
    try:
        from optiscope.zoo import DATASETS, MODELS
    except ImportError:
        return
    for field, spec, valid, what in (("model", model, MODELS, "model"), ("data", data, DATASETS, "dataset")):
        try:
            parse_spec(spec, valid, what)
        except SpecError as e:
            raise ConfigError(f"field {field!r}: {e}") from None


def build_problem(cfg: CompareConfig) -> Problem:
    dtype = torch.float64 if cfg.dtype == "float64" else None
    return Problem.from_specs(cfg.model, cfg.data, seed=cfg.seed, probe_size=cfg.probe_size, dtype=dtype)


def run_compare(cfg: CompareConfig, store: RunStore | str | Path, resume: bool = False) -> CompareResult:
    """Run (or resume) a comparison into ``store``: writes config.yaml (``kind: compare``), manifest, metrics,
    checkpoints. Reproducible: the same config gives the same metrics on the same CPU build."""
    if not isinstance(store, RunStore):
        store = RunStore(store)
    if not resume:
        existing = store.read_manifest() if store.path("manifest.json").exists() else {}
        if existing.get("runs") or store.list_checkpoints():
            from optiscope.lab.store import StoreError

            raise StoreError(f"{store.root} already holds a run; use `optiscope resume {store.root}` or another --out")
        store.write_config({"kind": "compare", **cfg.to_dict()})
    store.update_manifest(kind="compare", seed=cfg.seed, status="running")
    problem = build_problem(cfg)
    opts = dict(zip(cfg.run_names(), cfg.optimizers))
    return compare(problem, opts, cfg.steps, store=store, resume=resume, batch_size=cfg.batch_size,
                   probe_every=cfg.probe_every, probe_steps=cfg.probe_steps, probes=list(cfg.probes), seed=cfg.seed,
                   data_seed=cfg.data_seed, lr_schedule=cfg.lr_schedule, full_batch=cfg.full_batch,
                   accumulation_chunks=cfg.accumulation_chunks)


def load_compare_config(store: RunStore) -> CompareConfig:
    data = dict(store.read_config())
    kind = data.pop("kind", None)
    if kind != "compare":
        raise ConfigError(f"{store.path('config.yaml')} is not a lab comparison (kind={kind!r})")
    return CompareConfig.from_dict(data)


def demo_config(data: str | None = None) -> CompareConfig:
    """``optiscope demo``: SGD+M vs Adam from one init on Fashion-MNIST (digits when the Debian package
    ``dataset-fashion-mnist`` is absent) with loss, R_med, sharpness and one-norm probes; <= 3 min on 2 cores."""
    if data is None:
        data = "fashion_mnist:n_train=6000,n_test=1000" if FASHION_MNIST_DIR.is_dir() else "digits"
    return CompareConfig(model="mlp:depth=2,width=32", data=data,
                         optimizers=("sgdm:lr=0.05,momentum=0.9", "adam:lr=1e-3"), names=("sgdm", "adam"),
                         steps=600, batch_size=128, probe_every=50,
                         probes=("loss", "accuracy", "r_med", "sharpness:tol=1e-3,max_iter=40", "one_norm"),
                         seed=0, probe_size=512)


def with_fields(cfg: CompareConfig, **changes) -> CompareConfig:
    return dataclasses.replace(cfg, **changes)
