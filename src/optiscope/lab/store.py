"""RunStore: one run directory (DESIGN.md "Core contracts").

Layout::

    config.yaml        the resolved configuration
    manifest.json      versions, seed, git hash, status (running / finished / diverged at step t / failed), timings
    metrics.parquet    tidy long form: run, optimizer, step, metric, layer, value
    arrays/NAME.npz    arrays
    checkpoints/       <run>_step_00000100.pt (model + optimizer + RNG state), written by the lab at probe steps
    figures/NAME.png
    report.md          written by the report layer
    results.json       headline numbers and verdicts (experiments)

Every write is atomic (temp file + rename): an interrupted run never leaves a half-written file, and what was
already written stays readable. ``RunStore.check()`` reports each corrupt or partial file by name.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from optiscope.utils.atomic import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text

METRIC_COLUMNS = ["run", "optimizer", "step", "metric", "layer", "value"]


def empty_metrics() -> pd.DataFrame:
    """A tidy metrics frame with no rows and the column types of ``metrics.parquet``."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                         zip(METRIC_COLUMNS, ["str", "str", "int64", "str", "str", "float64"])})


class StoreError(RuntimeError):
    """A run directory cannot be used; the message names the file."""


def _git_hash() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict[str, Any]:
    """Versions and machine facts recorded in every manifest."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "git": _git_hash(),
    }
    for mod in ("optiscope", "torch", "numpy", "scipy", "pandas"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            info[mod] = None
    return info


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class RunStore:
    """A run directory. ``RunStore(path)`` creates it if needed; ``RunStore.open(path)`` requires it to exist."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create run directory {self.root}: {e.strerror or e}") from e
        elif not self.root.is_dir():
            raise StoreError(f"run directory {self.root} does not exist")
        self._metrics_cache: pd.DataFrame | None = None

    @classmethod
    def open(cls, root: str | os.PathLike) -> RunStore:
        return cls(root, create=False)

    # -- paths --------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def figures_dir(self) -> Path:
        d = self.path("figures")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def figure_path(self, name: str) -> Path:
        return self.figures_dir / (name if name.endswith(".png") else f"{name}.png")

    # -- config and manifest ------------------------------------------------------------------------
    def write_config(self, config: Any) -> Path:
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return atomic_write_text(self.path("config.yaml"), yaml.safe_dump(data, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        p = self.path("config.yaml")
        try:
            return yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise StoreError(f"{p} is missing") from None
        except yaml.YAMLError as e:
            raise StoreError(f"{p} is corrupt: {e}") from e

    def read_manifest(self) -> dict[str, Any]:
        p = self.path("manifest.json")
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{p} is corrupt: {e}") from e

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into manifest.json (creating it with environment info on first use)."""
        try:
            m = self.read_manifest()
        except StoreError:
            m = {}
        if not m:
            m = {"created": _now(), "environment": environment_info()}
        m.update(fields)
        m["updated"] = _now()
        atomic_write_json(self.path("manifest.json"), m)
        return m

    def set_status(self, status: str, **fields: Any) -> dict[str, Any]:
        return self.update_manifest(status=status, **fields)

    def update_run(self, name: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into ``manifest["runs"][name]`` (per-run status of a comparison)."""
        try:
            m = self.read_manifest()
        except StoreError:
            m = {}
        runs = dict(m.get("runs") or {})
        entry = dict(runs.get(name) or {})
        entry.update(fields)
        runs[name] = entry
        return self.update_manifest(runs=runs)

    # -- metrics ------------------------------------------------------------------------------------
    def read_metrics(self) -> pd.DataFrame:
        p = self.path("metrics.parquet")
        if not p.exists():
            return empty_metrics()
        try:
            return pd.read_parquet(p)
        except Exception as e:
            raise StoreError(f"{p} is corrupt or partial: {e}") from e

    def write_metrics(self, df: pd.DataFrame) -> Path:
        missing = [c for c in METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"metrics frame lacks columns {missing}; need {METRIC_COLUMNS}")
        df = df[METRIC_COLUMNS].copy()
        df["step"] = df["step"].astype("int64")
        df["value"] = df["value"].astype("float64")
        for c in ("run", "optimizer", "metric", "layer"):
            df[c] = df[c].astype("string")
        buf = io.BytesIO()
        df.reset_index(drop=True).to_parquet(buf, index=False)
        return atomic_write_bytes(self.path("metrics.parquet"), buf.getvalue())

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> Path:
        """Append tidy rows (dicts with the METRIC_COLUMNS; ``layer`` may be None) and rewrite atomically."""
        new = pd.DataFrame(list(rows), columns=METRIC_COLUMNS)
        old = self.read_metrics()
        df = new if old.empty else pd.concat([old, new], ignore_index=True)
        return self.write_metrics(df)

    # -- arrays, results, text -----------------------------------------------------------------------
    def write_arrays(self, name: str, **arrays: Any) -> Path:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        return atomic_write_bytes(self.path("arrays", f"{name}.npz"), buf.getvalue())

    def read_arrays(self, name: str) -> dict[str, np.ndarray]:
        p = self.path("arrays", f"{name}.npz")
        try:
            with np.load(p) as z:
                return {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise StoreError(f"{p} is missing") from None
        except Exception as e:
            raise StoreError(f"{p} is corrupt or partial: {e}") from e

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path(name), obj)

    def read_json(self, name: str) -> Any:
        p = self.path(name)
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise StoreError(f"{p} is missing") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"{p} is corrupt or partial: {e}") from e

    def write_results(self, results: Mapping[str, Any]) -> Path:
        return self.write_json("results.json", dict(results))

    def read_results(self) -> dict[str, Any]:
        return self.read_json("results.json")

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path(name), text)

    def save_figure(self, fig, name: str) -> Path:
        from optiscope.utils.plotting import save_figure

        return save_figure(fig, self.figure_path(name))

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_path(self, step: int, tag: str = "") -> Path:
        return self.path("checkpoints", f"{tag + '_' if tag else ''}step_{int(step):08d}.pt")

    def save_checkpoint(self, step: int, state: Any, tag: str = "") -> Path:
        import torch

        return atomic_write(self.checkpoint_path(step, tag), lambda fh: torch.save(state, fh))

    def list_checkpoints(self, tag: str = "") -> list[tuple[int, Path]]:
        d = self.path("checkpoints")
        if not d.is_dir():
            return []
        prefix = f"{tag}_step_" if tag else "step_"
        out = []
        for p in d.glob(f"{prefix}*.pt"):
            try:
                out.append((int(p.stem[len(prefix):]), p))
            except ValueError:
                continue
        return sorted(out)

    def load_checkpoint(self, path: Path) -> Any:
        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise StoreError(f"checkpoint {path} is corrupt or partial: {e}") from e

    # -- integrity ------------------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Try to read every file; return one message per corrupt or partial file (empty list: all good)."""
        problems: list[str] = []
        checks = [
            ("config.yaml", self.read_config),
            ("manifest.json", self.read_manifest),
            ("metrics.parquet", self.read_metrics),
            ("results.json", self.read_results),
        ]
        for name, fn in checks:
            if self.path(name).exists():
                try:
                    fn()
                except StoreError as e:
                    problems.append(str(e))
        for p in sorted(self.path("arrays").glob("*.npz")) if self.path("arrays").is_dir() else []:
            try:
                self.read_arrays(p.stem)
            except StoreError as e:
                problems.append(str(e))
        return problems
