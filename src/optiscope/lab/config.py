"""``CompareConfig``: the frozen config behind ``optiscope compare`` / ``resume`` / ``demo``, and its runner.

A comparison directory's ``config.yaml`` is a ``CompareConfig`` (plus ``kind: compare``), so ``optiscope resume DIR``
can rebuild the identical problem and continue every run from its last checkpoint. :func:`run_compare` holds the
directory's writer lock, refuses to write into a directory that holds another run (``resume=True`` continues it
after checking that ``config.yaml`` is complete and unchanged, ``force=True`` moves the old run aside), and refuses
to resume when the checkpoints were written under another config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from optiscope.lab.probes import make_probes
from optiscope.lab.problem import Problem
from optiscope.lab.run import (
    DIVERGENCE_FACTOR,
    CompareResult,
    check_finite_spec,
    compare,
    lr_factor_fn,
    optimizer_label,
)
from optiscope.lab.store import RunStore, StoreError, config_differences, config_hash
from optiscope.utils.config import Config, ConfigError, require
from optiscope.utils.spec import SpecError, parse_spec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


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
    divergence_factor: float | None = DIVERGENCE_FACTOR
    device: str = "cpu"

    def validate(self) -> None:
        require(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.probe_every >= 0, "probe_every", self.probe_every, ">= 0 (0: first and last step only)")
        require(self.probe_size >= 1, "probe_size", self.probe_size, ">= 1")
        require(len(self.optimizers) >= 1, "optimizers", self.optimizers, "at least one optimizer spec")
        require(len(self.probes) >= 1 and all(isinstance(p, str) and p.strip() for p in self.probes), "probes",
                self.probes, "at least one probe spec, e.g. loss (an empty list would record only the batch loss)")
        require(self.divergence_factor is None or (math.isfinite(self.divergence_factor)
                                                   and self.divergence_factor > 1),
                "divergence_factor", self.divergence_factor, "a finite number > 1, or none")
        require(isinstance(self.device, str) and _DEVICE_RE.match(self.device) is not None, "device", self.device,
                "cpu, cuda, cuda:N or auto")
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
                check_finite_spec(spec, "optimizer")
            except (SpecError, ValueError) as e:
                raise ConfigError(f"field 'optimizers': {e}") from None
        for fname, spec in (("model", self.model), ("data", self.data), ("lr_schedule", self.lr_schedule),
                            *(("probes", p) for p in self.probes)):
            if spec is not None:
                try:
                    check_finite_spec(spec, fname)
                except ValueError as e:
                    raise ConfigError(f"field {fname!r}: {e}") from None
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


def resolve_device_name(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; a CUDA device that is absent -> ValueError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu")
        idx = int(device.split(":", 1)[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return device


def build_problem(cfg: CompareConfig) -> Problem:
    """The zoo problem of a comparison, on ``cfg.device``."""
    dtype = torch.float64 if cfg.dtype == "float64" else None
    device = resolve_device_name(cfg.device)
    extra = {} if device == "cpu" else {"device": device}
    return Problem.from_specs(cfg.model, cfg.data, seed=cfg.seed, probe_size=cfg.probe_size, dtype=dtype, **extra)


def _check_checkpoint_hashes(store: RunStore, expected: str) -> None:
    """Refuse to resume when every readable checkpoint record names another config hash (config.yaml edited and
    the manifest lost): the checkpoints would be discarded and the results silently replaced."""
    hashes = set()
    d = store.path("checkpoints")
    for rec in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            h = store.checkpoint_meta(rec.with_suffix(".pt")).get("config_hash")
        except StoreError:
            continue
        if h is not None:
            hashes.add(h)
    if hashes and expected not in hashes:
        raise StoreError(f"{store.path('config.yaml')} does not match the run's checkpoints (config hash {expected}; "
                         f"checkpoints were written under {sorted(hashes)}): it was changed after the run started; "
                         "restore it or start a new run in another directory")


def _started_but_empty(store: RunStore, data: dict) -> bool:
    """A directory where this same comparison was started but nothing was measured (killed before its first
    checkpoint): starting it again loses nothing."""
    try:
        if config_differences(store.read_config(), data) or (store.read_manifest().get("runs") or {}):
            return False
    except StoreError:
        return False
    has_ck = store.path("checkpoints").is_dir() and any(store.path("checkpoints").iterdir())
    return not (store.path("metrics.parquet").exists() or store.metric_parts() or has_ck)


def run_compare(cfg: CompareConfig, store: RunStore | str | Path, resume: bool = False, force: bool = False,
                keep_checkpoints: int | None = None) -> CompareResult:
    """Run (or resume) a comparison into ``store``: writes config.yaml (``kind: compare``), manifest, metrics,
    checkpoints. Reproducible: the same config gives the same metrics on the same CPU build.

    A directory that already holds a run is refused unless ``resume`` (continue it: the config must equal the
    recorded one, field by field) or ``force`` (move the old run aside to ``DIR.old-TIMESTAMP`` and start anew).
    ``keep_checkpoints=N`` keeps only each run's newest N checkpoints."""
    if not isinstance(store, RunStore):
        store = RunStore(store)
    if cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device=resolve_device_name("auto"))
    data = {"kind": "compare", **cfg.to_dict()}
    with store.lock():
        if resume:
            recorded = store.verify_config(fields=["kind", *CompareConfig.field_names()])
            diffs = config_differences(recorded, data)
            if diffs:
                raise StoreError(f"{store.root} holds another comparison: " + "; ".join(diffs))
            _check_checkpoint_hashes(store, config_hash(data))
            if store.config_hash() is None:  # manifest lost or corrupt: re-record the verified config
                store.notices.append(f"{store.path('manifest.json')} is missing or unreadable: recording the config "
                                     f"hash of {store.path('config.yaml')} again (checked against the checkpoints)")
                store.update_manifest(config_hash=config_hash(data), config=data)
        else:
            if store.holds_run() and not _started_but_empty(store, data):
                if not force:
                    try:
                        m = store.read_manifest()
                    except StoreError:
                        m = {}
                    what = m.get("experiment") or m.get("kind") or "a run"
                    raise StoreError(f"{store.root} already holds {what} (status {m.get('status', 'unknown')}); use "
                                     f"`optiscope resume {store.root}` (or --resume) to continue it, --force to move "
                                     "it aside, or another --out")
                store.move_aside()
            store.write_config(data)
        store.update_manifest(kind="compare", seed=cfg.seed, status="running")
        problem = build_problem(cfg)
        opts = dict(zip(cfg.run_names(), cfg.optimizers))
        return compare(problem, opts, cfg.steps, store=store, resume=resume, batch_size=cfg.batch_size,
                       probe_every=cfg.probe_every, probe_steps=cfg.probe_steps, probes=list(cfg.probes),
                       seed=cfg.seed, data_seed=cfg.data_seed, lr_schedule=cfg.lr_schedule,
                       full_batch=cfg.full_batch, accumulation_chunks=cfg.accumulation_chunks,
                       divergence_factor=cfg.divergence_factor, keep_checkpoints=keep_checkpoints)


def load_compare_config(store: RunStore) -> CompareConfig:
    """The ``CompareConfig`` of a comparison directory; refuses a config.yaml that is not a comparison or lacks
    fields (naming them) instead of filling in defaults."""
    data = dict(store.read_config())
    kind = data.pop("kind", None)
    if kind != "compare":
        raise ConfigError(f"{store.path('config.yaml')} is not a lab comparison (kind={kind!r})")
    missing = [f for f in CompareConfig.field_names() if f not in data]
    if missing:
        raise ConfigError(f"{store.path('config.yaml')} lacks field(s) {missing}; refusing to use defaults for them "
                          "(restore the file or start a new run)")
    return CompareConfig.from_dict(data)


def demo_config(data: str | None = None) -> CompareConfig:
    """``optiscope demo``: SGD+M vs Adam from one init on Fashion-MNIST (digits when the Debian package
    ``dataset-fashion-mnist`` is absent) with loss, R_med, sharpness, preconditioned sharpness (Adam's stability
    quantity) and one-norm probes; <= 3 min on 2 cores."""
    if data is None:
        data = "fashion_mnist:n_train=6000,n_test=1000" if FASHION_MNIST_DIR.is_dir() else "digits"
    return CompareConfig(model="mlp:depth=2,width=32", data=data,
                         optimizers=("sgdm:lr=0.05,momentum=0.9", "adam:lr=1e-3"), names=("sgdm", "adam"),
                         steps=600, batch_size=128, probe_every=50,
                         probes=("loss", "accuracy", "r_med", "sharpness:tol=1e-3,max_iter=40",
                                 "precond_sharpness:tol=1e-3,max_iter=40", "one_norm"),
                         seed=0, probe_size=512)


def with_fields(cfg: CompareConfig, **changes) -> CompareConfig:
    """``cfg`` with ``changes`` (validated)."""
    return dataclasses.replace(cfg, **changes)
