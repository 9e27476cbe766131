"""Experiment registry and runner (docs/architecture.md).

An experiment is one module in a per-paper subpackage of ``optiscope.experiments`` (e.g.
``optiscope.experiments.diagonal_uniformity``) that registers a run function::

    @dataclass(frozen=True)
    class MyConfig(Config):
        seed: int = 0
        steps: int = 100
        def validate(self): require(self.steps > 0, "steps", self.steps, "> 0")

    @register("my_experiment", paper="004", title="...", config=MyConfig,
              presets={"quick": MyConfig(), "full": MyConfig(steps=10_000)})
    def run(config: MyConfig, store: RunStore) -> Result:
        ...
        return Result(claims=[Claim("c1", "what the paper claims", paper=..., measured=..., holds=...)],
                      metrics={...})

``run_experiment`` resolves the preset, applies overrides, writes ``config.yaml`` and ``manifest.json``, calls the
function and writes ``results.json`` with the shape
``{"experiment", "preset", "seed", "claims": [{"id", "claim", "paper", "measured", "holds", "reason", "tier"}],
"metrics": {...}}``. ``holds`` is three-valued (True / False / None = untestable here, the claim's premise did not
occur); ``reason`` says why, and ``tier`` names the preset that decided the claim (default: the preset that ran).
Verdicts come from the one rule in :mod:`optiscope.metrics.verdicts`; :meth:`Claim.judged` builds a claim from a
:class:`~optiscope.metrics.verdicts.Verdict`. A claim that does not reproduce is reported with ``holds=False``,
never tuned away.

Preset tiers: ``quick`` (CPU, minutes: does it run), ``medium`` (optional; <= 20 minutes on 2 CPU cores,
designed so that the claim could fail) and ``full`` (paper scale). ``quick`` and ``full`` are required.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiscope.lab.store import RunStore
from optiscope.utils.config import Config, ConfigError

if TYPE_CHECKING:
    import torch


TIERS = ("quick", "medium", "full")
"""Recognised preset tiers, smallest first; ``quick`` and ``full`` are required, ``medium`` is optional."""


@dataclass
class Claim:
    """One claim of a paper: what the paper reports, what we measured, and whether it holds.

    ``holds`` is True, False or None (untestable here); ``reason`` says why (empty when not given); ``tier`` is the
    preset that decided the claim (``None``: filled in by :func:`run_experiment` with the preset that ran).
    """

    id: str
    claim: str
    paper: Any
    measured: Any
    holds: bool | None
    reason: str = ""
    tier: str | None = None

    @classmethod
    def judged(cls, id: str, claim: str, paper: Any, measured: Any, verdict: tuple[bool | None, str],
               tier: str | None = None) -> Claim:
        """Build a claim from a ``(holds, reason)`` verdict of :mod:`optiscope.metrics.verdicts`."""
        holds, reason = verdict
        return cls(id, claim, paper, measured, holds, reason, tier)

    def to_dict(self, tier: str | None = None) -> dict[str, Any]:
        """JSON form; ``tier`` is the fallback used when the claim has none of its own."""
        return {"id": self.id, "claim": self.claim, "paper": self.paper, "measured": self.measured,
                "holds": None if self.holds is None else bool(self.holds), "reason": str(self.reason or ""),
                "tier": self.tier if self.tier is not None else tier}


@dataclass
class Result:
    """What an experiment's run function returns: its claims and headline metrics (written to results.json)."""

    claims: list[Claim] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentSpec:
    """A registered experiment: name, paper, title, config class, presets (tiers) and run function."""

    name: str
    paper: str
    title: str
    config: type[Config]
    presets: Mapping[str, Config]
    fn: Callable[[Config, RunStore], Result]
    description: str = ""
    cpu_only: str = ""
    """Why the experiment runs on the CPU only (empty: its config has a ``device`` field)."""


_REGISTRY: dict[str, ExperimentSpec] = {}
_DISCOVERED = False


def register(name: str, *, paper: str, title: str, config: type[Config], presets: Mapping[str, Config],
             cpu_only: str = ""):
    """Decorator registering ``fn(config, store) -> Result`` under ``name``.

    ``presets`` must include ``quick`` and ``full`` and may include ``medium``; no other names (see ``TIERS``).
    ``cpu_only``: the reason an experiment without a ``device`` config field runs on the CPU only (e.g. "numpy
    theory, no torch tensors"); an experiment cannot have both.
    """
    if cpu_only and "device" in config.field_names():
        raise ValueError(f"experiment {name!r}: cpu_only is given but config {config.__name__} has a device field")
    missing = {"quick", "full"} - set(presets)
    if missing:
        raise ValueError(f"experiment {name!r}: presets {sorted(missing)} are missing")
    unknown = set(presets) - set(TIERS)
    if unknown:
        raise ValueError(f"experiment {name!r}: unknown preset tiers {sorted(unknown)}; allowed: {', '.join(TIERS)}")
    presets = {t: presets[t] for t in TIERS if t in presets}
    for p, cfg in presets.items():
        if not isinstance(cfg, config):
            raise TypeError(f"experiment {name!r}: preset {p!r} is not a {config.__name__}")
        if "seed" not in config.field_names():
            raise TypeError(f"experiment {name!r}: config {config.__name__} needs a 'seed' field")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn.__module__ != fn.__module__:
            raise ValueError(f"experiment name {name!r} is registered twice")
        _REGISTRY[name] = ExperimentSpec(name, paper, title, config, dict(presets), fn, (fn.__doc__ or "").strip(),
                                         str(cpu_only))
        return fn

    return deco


def require_device(device: Any, field: str = "device") -> None:
    """Config validation of a device field: ``ConfigError`` naming the value and the devices of this machine unless
    ``device`` is ``"cpu"``, ``"auto"`` or a device that exists here (``"cuda"``, ``"cuda:N"``; resolved by
    :func:`optiscope.lab.problem.resolve_device`). Other device types (``"meta"``: no data, ``"mps"``) are refused."""
    from optiscope.lab.problem import resolve_device

    if not isinstance(device, str) or not device.strip():
        raise ConfigError(f"field {field!r} = {device!r} is invalid; allowed: a device name (cpu, cuda, cuda:N, "
                          f"auto); {_devices_here()}")
    try:
        dev = resolve_device(device.strip())
    except ValueError as e:
        raise ConfigError(f"field {field!r} = {device!r} is invalid: {e}; {_devices_here()}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"field {field!r} = {device!r} is invalid: experiments run on cpu or cuda, not "
                          f"{dev.type!r}; {_devices_here()}")


def _devices_here() -> str:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = f"cuda (cuda:0..cuda:{n - 1})" if n else "no CUDA device"
    return f"this machine has: cpu, {cuda}"


def experiment_device(config: Config) -> torch.device:
    """The ``torch.device`` of a config's ``device`` field (``"auto"``: CUDA when available, else the CPU)."""
    from optiscope.lab.problem import resolve_device

    return resolve_device(str(getattr(config, "device", "cpu")).strip())


def device_support(spec: ExperimentSpec) -> tuple[bool, str]:
    """``(True, "")`` for an experiment whose config has a ``device`` field, else ``(False, reason)`` with the reason
    it runs on the CPU only (registered as ``cpu_only``; a generic one when none was registered)."""
    if "device" in spec.config.field_names():
        return True, ""
    return False, spec.cpu_only or f"config {spec.config.__name__} has no device field"


def discover() -> None:
    """Import every module of ``optiscope.experiments`` and of its per-paper subpackages (e.g.
    ``optiscope.experiments.diagonal_uniformity.rmed_lm``) so that their ``register`` calls run.

    Modules and packages whose name starts with ``_`` are skipped, as is this module.
    """
    global _DISCOVERED
    if _DISCOVERED:
        return
    import optiscope.experiments as pkg

    for mod in pkgutil.walk_packages(pkg.__path__, prefix="optiscope.experiments."):
        parts = mod.name.split(".")[2:]
        if mod.ispkg or any(p.startswith("_") for p in parts) or mod.name == __name__:
            continue
        importlib.import_module(mod.name)
    _DISCOVERED = True


def registry() -> dict[str, ExperimentSpec]:
    """All registered experiments by name (imports the experiment modules on first use)."""
    discover()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> ExperimentSpec:
    """The registered experiment ``name``; ``KeyError`` listing the valid names otherwise."""
    reg = registry()
    if name not in reg:
        raise KeyError(f"unknown experiment {name!r}; valid: {', '.join(reg)}")
    return reg[name]


def resolve_config(name: str, preset: str = "quick", overrides: Iterable[str] = (),
                   config_file: str | Path | None = None) -> Config:
    """The config of ``name`` at ``preset``, updated from ``config_file`` and ``key=value`` overrides."""
    spec = get(name)
    if preset not in spec.presets:
        raise ConfigError(f"unknown preset {preset!r} for {name}; valid: {', '.join(spec.presets)}")
    cfg = spec.presets[preset]
    if config_file is not None:
        cfg = spec.config.from_file(config_file, base=cfg)
    return cfg.with_overrides(list(overrides))


def run_experiment(name: str, preset: str = "quick", out: str | Path | None = None,
                   overrides: Iterable[str] = (), config: Config | None = None,
                   config_file: str | Path | None = None) -> RunStore:
    """Run a registered experiment into ``out`` (default ``runs/NAME-PRESET``); return its RunStore."""
    spec = get(name)
    cfg = config if config is not None else resolve_config(name, preset, overrides, config_file)
    store = RunStore(out or Path("runs") / f"{name}-{preset}")
    # the writer lock for the whole experiment: a second writer is refused, and a reader opening the directory
    # meanwhile leaves this run's temporary files alone
    with store.lock():
        return _run_locked(name, preset, spec, cfg, store)


def _run_locked(name: str, preset: str, spec: ExperimentSpec, cfg: Config, store: RunStore) -> RunStore:
    store.write_config(cfg)
    store.set_status("running", experiment=name, preset=preset, seed=getattr(cfg, "seed", None),
                     paper=spec.paper, started=time.time())
    t0 = time.perf_counter()
    try:
        result = spec.fn(cfg, store)
    except BaseException as exc:
        store.set_status("failed", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc(limit=20), seconds=time.perf_counter() - t0)
        raise
    if not isinstance(result, Result):
        raise TypeError(f"experiment {name!r} returned {type(result).__name__}, expected Result")
    results = {
        "experiment": name,
        "preset": preset,
        "seed": getattr(cfg, "seed", None),
        "claims": [c.to_dict(tier=preset) for c in result.claims],
        "metrics": result.metrics,
    }
    store.write_results(results)
    store.set_status("finished", seconds=time.perf_counter() - t0)
    return store


__all__ = [
    "TIERS",
    "Claim",
    "ExperimentSpec",
    "Result",
    "device_support",
    "experiment_device",
    "get",
    "register",
    "registry",
    "require_device",
    "resolve_config",
    "run_experiment",
]
