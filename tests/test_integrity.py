"""Run directories that cannot be corrupted: one writer at a time, config integrity, verified checkpoints, metrics
that survive torn or damaged files, liveness, divergence, file modes, leftover temp files, --keep-checkpoints.

Every corruption case ends either *recovered* (resume exits 0, names the damaged file, and ends with exactly the
metrics of an uninterrupted run; the damaged file is moved aside, not deleted) or *refused* (exit 2 with a message
naming the file or field, and every file of the directory unchanged)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import test_lab_common  # noqa: F401  (single-threaded torch)
import torch
from typer.testing import CliRunner

from optiscope.cli.main import app
from optiscope.lab import Run, RunStore, StoreError
from optiscope.lab.config import CompareConfig, run_compare
from optiscope.lab.store import RunLockedError

HERE = Path(__file__).resolve().parent
CFG = CompareConfig(model="mlp:depth=2,width=8", data="digits:n_train=96,n_test=32",
                    optimizers=("sgdm:lr=0.1,momentum=0.9", "adam:lr=1e-2"), names=("sgdm", "adam"), steps=24,
                    batch_size=16, probe_every=4, probes=("loss", "r_med:per_layer=5", "weight_spectrum"), seed=3)
KILL_AT = 16  # the interrupted run dies after writing adam's rows of step 16, before its checkpoint


class _Kill(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no final status is written."""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def frame(path) -> pd.DataFrame:
    df = RunStore.open(path).read_metrics()
    return df.sort_values(["run", "step", "metric", "layer"]).reset_index(drop=True)


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (the lock file excluded: its holder line is emptied on release)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A clean finished comparison and an interrupted one (adam killed at step 16: parts written, no checkpoint)."""
    root = tmp_path_factory.mktemp("integrity")
    run_compare(CFG, root / "clean")
    orig = Run._save_checkpoint

    def killing(self, store, step, *a, **k):
        if self.name == "adam" and step == KILL_AT:
            raise _Kill()
        return orig(self, store, step, *a, **k)

    Run._save_checkpoint = killing
    try:
        with pytest.raises(_Kill):
            run_compare(CFG, root / "killed")
    finally:
        Run._save_checkpoint = orig
    st = RunStore.open(root / "killed")
    assert st.read_manifest()["runs"]["adam"]["status"] == "running"
    assert [s for s, _ in st.list_checkpoints("adam")][-1] == KILL_AT - 4
    assert any("adam@" in p.name for p in st.metric_parts())  # not compacted: a kill leaves parts
    other = CFG.replace(seed=4)
    run_compare(other, root / "other")  # a different config: the source of foreign checkpoints
    return root


def _ck(d: Path, run: str, step: int) -> Path:
    return d / "checkpoints" / f"{run}_step_{step:08d}.pt"


def _urandom_non_utf8(n: int = 256) -> bytes:
    return b"\xcd\xff\xfe" + os.urandom(n)


def _adam_part(d: Path, which: int = -1) -> Path:
    return [p for p in RunStore.open(d).metric_parts() if "adam@" in p.name][which]


# name -> (corrupt(d, root), expectation, needle in the output)
CASES = {
    "config_random_bytes": (lambda d, r: (d / "config.yaml").write_bytes(_urandom_non_utf8()), "refused",
                            r"config\.yaml is corrupt: not UTF-8"),
    "config_truncated_after_a_line": (
        lambda d, r: (d / "config.yaml").write_text("".join((d / "config.yaml").read_text().splitlines(True)[:12])),
        "refused", r"config\.yaml lacks field\(s\) \[.*'probes'"),
    "config_probes_edited": (
        lambda d, r: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("r_med:per_layer=5",
                                                                                            "r_med:per_layer=50")),
        "refused", r"field 'probes' = .*differs from the recorded"),
    "config_malformed_yaml": (lambda d, r: (d / "config.yaml").write_text("model: [mlp\nsteps: 24\n"), "refused",
                              r"config\.yaml is corrupt"),
    "config_python_object_tag": (
        lambda d, r: (d / "config.yaml").write_text(f"kind: !!python/object/apply:os.system ['touch {d}/PWNED']\n"),
        "refused", r"config\.yaml is corrupt: .*constructor"),
    "manifest_random_bytes": (lambda d, r: (d / "manifest.json").write_bytes(_urandom_non_utf8()), "recovered",
                              r"manifest\.json is corrupt"),
    "manifest_truncated": (lambda d, r: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:300]),
                           "recovered", r"manifest\.json is corrupt"),
    "metrics_random_bytes": (lambda d, r: (d / "metrics.parquet").write_bytes(os.urandom(500)), "recovered",
                             r"metrics\.parquet is corrupt"),
    "metrics_deleted": (lambda d, r: (d / "metrics.parquet").unlink(), "recovered",
                        r"metrics of run 'sgdm' up to step 24 are incomplete"),
    "metrics_part_random_bytes": (lambda d, r: _adam_part(d, 1).write_bytes(os.urandom(300)), "recovered",
                                  r"metrics\.parts/\S+adam@00000004\.parquet is corrupt"),
    "checkpoint_random_bytes": (lambda d, r: _ck(d, "adam", 12).write_bytes(os.urandom(2000)), "recovered",
                                r"adam_step_00000012\.pt is corrupt or partial \(SHA-256"),
    "checkpoint_truncated": (lambda d, r: _ck(d, "adam", 12).write_bytes(_ck(d, "adam", 12).read_bytes()[:700]),
                             "recovered", r"adam_step_00000012\.pt is corrupt or partial"),
    "checkpoint_record_garbage": (lambda d, r: _ck(d, "adam", 12).with_suffix(".json").write_text("{\"format\": 2,"),
                                  "recovered", r"record \S+adam_step_00000012\.json is corrupt"),
    "checkpoint_record_missing": (lambda d, r: _ck(d, "adam", 12).with_suffix(".json").unlink(), "recovered",
                                  r"adam_step_00000012\.pt has no record"),
    "checkpoint_of_another_run": (
        lambda d, r: [shutil.copy(_ck(d, "sgdm", 12).with_suffix(s), _ck(d, "adam", 12).with_suffix(s))
                      for s in (".pt", ".json")], "recovered",
        r"adam_step_00000012\.pt belongs to another run: its run is 'sgdm'"),
    "checkpoint_of_another_config": (
        lambda d, r: [shutil.copy(_ck(r / "other", "adam", 12).with_suffix(s), _ck(d, "adam", 12).with_suffix(s))
                      for s in (".pt", ".json")], "recovered",
        r"adam_step_00000012\.pt belongs to another run: its config_hash"),
    "arrays_random_bytes": (
        lambda d, r: (d / "arrays" / "adam_singular_values.layers.0.weight.npz").write_bytes(os.urandom(400)),
        "recovered", r"adam_singular_values\.layers\.0\.weight\.npz is corrupt"),
    "stale_lock_of_a_dead_process": (
        lambda d, r: (d / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename,
                                                          "started": "2026-01-01T00:00:00"})), "recovered",
        r"took over the stale lock .* pid 4206649 .*process gone"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corruption_is_named_and_recovered_or_refused_without_loss(dirs, tmp_path, case, capfd):
    corrupt, expect, needle = CASES[case]
    d = tmp_path / "run"
    shutil.copytree(dirs / "killed", d)
    corrupt(d, dirs)
    before = snapshot(d)
    r = invoke("show", d)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert r.exit_code == 0
    if expect == "refused":
        assert snapshot(d) == before  # show never writes
    r = invoke("resume", d, "--quiet")
    text = " ".join((r.output + capfd.readouterr().err).split())
    assert "Traceback" not in text
    assert re.search(needle, text), text
    if expect == "refused":
        assert r.exit_code == 2, text
        assert snapshot(d) == before, "a refused resume changed the directory"
        assert not (d / "PWNED").exists()
    else:
        assert r.exit_code == 0, text
        pd.testing.assert_frame_equal(frame(d), frame(dirs / "clean"), check_exact=True)
        st = RunStore.open(d)
        assert st.read_manifest()["status"] == "finished"
        assert all(v["status"] == "finished" for v in st.read_manifest()["runs"].values())
        assert st.check() == [], st.check()
        damaged = [p for p in d.rglob("*.corrupt-*")]
        if case.startswith(("manifest_random", "manifest_trunc", "metrics_random", "metrics_part", "checkpoint_r",
                            "checkpoint_t", "arrays")):
            assert damaged, "the damaged file must be moved aside, not deleted"


def test_show_names_dead_run_and_validates_checkpoints(dirs, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(dirs / "killed", d)
    st = RunStore.open(d)
    st.update_manifest(status="running")  # what a SIGKILL leaves behind
    r = invoke("show", d)
    assert r.exit_code == 0 and "stopped (process gone)" in " ".join(r.output.split()), r.output
    _ck(d, "sgdm", 8).write_bytes(b"garbage")
    r = invoke("show", d)
    assert "sgdm_step_00000008.pt is corrupt" in " ".join(r.output.split())
    with st.lock():
        assert st.liveness() == "running"


def test_checkpoints_load_with_weights_only_and_no_pickled_code(dirs, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(dirs / "killed", d)
    st = RunStore.open(d)
    p = _ck(d, "adam", 12)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d}/PWNED",))

    torch.save({"t0": torch.zeros(1), "evil": Evil()}, p)  # a pickle that would run code under weights_only=False
    rec = json.loads(p.with_suffix(".json").read_text())
    rec["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()  # even with a matching hash
    p.with_suffix(".json").write_text(json.dumps(rec))
    with pytest.raises(StoreError, match="corrupt or partial"):
        st.load_checkpoint(p)
    assert not (d / "PWNED").exists()
    r = invoke("resume", d, "--quiet")
    assert r.exit_code == 0 and not (d / "PWNED").exists()
    pd.testing.assert_frame_equal(frame(d), frame(dirs / "clean"), check_exact=True)


def test_run_or_compare_into_an_existing_run_refuses_resume_continues_force_moves_aside(dirs, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(dirs / "clean", d)
    before = snapshot(d)
    r = invoke("run", "init_chain", "--out", d, "--quiet")
    assert r.exit_code == 2 and "already holds compare" in " ".join(r.output.split()) and snapshot(d) == before
    args = ["compare", "--config", tmp_path / "c.yaml", "--out", d, "--quiet"]
    (tmp_path / "c.yaml").write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in CFG.to_dict().items()}))
    r = invoke(*args)
    assert r.exit_code == 2 and "--resume" in r.output and snapshot(d) == before
    r = invoke(*args, "--set", "steps=20", "--resume")
    assert r.exit_code == 2 and "field 'steps' = 20 differs" in " ".join(r.output.split()) and snapshot(d) == before
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    pd.testing.assert_frame_equal(frame(d), frame(dirs / "clean"), check_exact=True)
    r = invoke(*args, "--force", "--set", "steps=8")
    assert r.exit_code == 0, r.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and "moved the previous run" in " ".join(r.output.split())
    pd.testing.assert_frame_equal(frame(aside[0]), frame(dirs / "clean"), check_exact=True)
    assert frame(d)["step"].max() == 8


def test_second_writer_gets_a_clear_error_naming_the_holder(dirs, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(dirs / "killed", d)
    st = RunStore.open(d)
    with st.lock():
        before = snapshot(d)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-m", "optiscope.cli.main", "resume", str(d), "--quiet"], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        msg = " ".join(out.stderr.split())
        assert f"is in use by pid {os.getpid()} on host" in msg and "Traceback" not in msg
        assert snapshot(d) == before
        with pytest.raises(RunLockedError):
            # the lock is per process: a second process (simulated through a fresh file description) is refused
            from optiscope.utils import lock as lk

            other = lk.DirectoryLock(d)
            try:
                other.acquire(wait=0.2)
            except lk.LockHeldError as e:
                raise RunLockedError(str(e)) from None


def _spawn(args, env):
    return subprocess.Popen([sys.executable, "-m", "optiscope.cli.main", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_writers_one_is_refused(tmp_path):
    """Two `resume DIR` at once and two `compare --out SAME` at once: in each pair exactly one writes, the other
    exits 2 naming the holder, and the result has no duplicate rows."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    long = ["--model", "mlp:depth=2,width=16", "--data", "digits:n_train=200,n_test=40", "--steps", "160",
            "--batch", "16", "--probe-every", "10", "--probes", "loss,r_med:per_layer=30,sharpness", "--quiet"]
    refused = 0
    # pair 1: two compares into the same directory
    d = tmp_path / "cmp"
    procs = [_spawn(["compare", *long, "--opt", "adam:lr=1e-2", "--out", d], env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    errs = " ".join(" ".join(e.split()) for _, e in outs)
    assert codes == [0, 2], (codes, errs[-3000:])
    assert re.search(r"is in use by pid \d+ on host|already holds compare", errs), errs[-3000:]
    refused += 1
    df = RunStore.open(d).read_metrics()
    assert not df.duplicated(["run", "step", "metric", "layer"]).any()
    # pair 2: two resumes of one interrupted run
    st = RunStore.open(d)
    for s, p in st.list_checkpoints("adam"):
        if s > 40:
            st.delete_checkpoint(p)
    st.update_run("adam", status="running")
    procs = [_spawn(["resume", d, "--quiet"], env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    errs = " ".join(" ".join(e.split()) for _, e in outs)
    assert codes == [0, 2], (codes, errs[-3000:])
    assert re.search(r"is in use by pid \d+ on host", errs), errs[-3000:]
    refused += 1
    df2 = RunStore.open(d).read_metrics()
    assert not df2.duplicated(["run", "step", "metric", "layer"]).any()
    m = df2.merge(df, on=["run", "optimizer", "step", "metric", "layer"], how="outer", suffixes=("_r", "_f"))
    assert m[m["value_r"] != m["value_f"]].empty, (m[m["value_r"] != m["value_f"]].head(20).to_string(), errs[-2000:])
    pd.testing.assert_frame_equal(df2.sort_values(["run", "step", "metric", "layer"]).reset_index(drop=True),
                                  df.sort_values(["run", "step", "metric", "layer"]).reset_index(drop=True),
                                  check_exact=True)
    assert refused == 2


def test_divergence_by_loss_factor_reports_no_probes(tmp_path):
    r = invoke("compare", "--model", "mlp:depth=2,width=8", "--data", "digits:n_train=120,n_test=40", "--steps",
               "6", "--batch", "32", "--probe-every", "3", "--probes", "loss,r_med:per_layer=5", "--opt",
               "adam:lr=1e6", "--out", tmp_path / "x", "--quiet")
    assert r.exit_code == 0, r.output
    assert "adam: diverged at step" in r.output
    st = RunStore.open(tmp_path / "x")
    assert st.read_manifest()["status"] == "finished (1 of 1 diverged)"
    df = st.read_metrics()
    t = int(df.loc[df["metric"] == "diverged", "value"].iloc[0])
    assert not ((df["metric"] == "r_med") & (df["step"] >= t)).any()  # no probe of the diverged model
    assert df.loc[df["metric"] == "r_med", "value"].map(lambda v: abs(v) < float("inf")).all()
    # the factor is configurable; None keeps only the non-finite test
    run = Run(test_lab_common.tiny_problem(), "adam:lr=1e3", steps=4, batch_size=16, probes=["loss"],
              divergence_factor=None)
    assert run.divergence_factor is None
    with pytest.raises(ValueError, match="divergence_factor"):
        Run(test_lab_common.tiny_problem(), "sgd:lr=0.1", steps=4, divergence_factor=float("nan"))


def test_files_follow_the_umask_and_temp_files_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        run_compare(CFG.replace(steps=4), tmp_path / "m")
    finally:
        os.umask(old)
    d = tmp_path / "m"
    modes = {p.name: p.stat().st_mode & 0o777 for p in d.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
    leftover = [d / ".metrics.parquet.abcd1234.tmp", d / "checkpoints" / ".adam_step_00000004.pt.zz_z9y8x.tmp"]
    for p in leftover:
        p.write_bytes(b"partial")
    st = RunStore.open(d)
    assert not any(p.exists() for p in leftover)
    assert any("removed 2 temporary file" in n for n in st.notices)


def test_keep_checkpoints(tmp_path):
    run_compare(CFG, tmp_path / "k", keep_checkpoints=2)
    st = RunStore.open(tmp_path / "k")
    assert [s for s, _ in st.list_checkpoints("adam")] == [20, 24]
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("adam_*.json")) == [
        "adam_step_00000020.json", "adam_step_00000024.json"]
    r = invoke("compare", "--model", "mlp:depth=2,width=8", "--data", "digits:n_train=96,n_test=32", "--steps", "8",
               "--batch", "16", "--probe-every", "2", "--probes", "loss", "--opt", "sgd:lr=0.1", "--out",
               tmp_path / "c", "--keep-checkpoints", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert [s for s, _ in RunStore.open(tmp_path / "c").list_checkpoints("sgd")] == [8]
    r = invoke("compare", "--steps", "4", "--out", tmp_path / "e", "--keep-checkpoints", "0")
    assert r.exit_code == 2
    with pytest.raises(ValueError, match="keep_checkpoints = 0"):
        Run(test_lab_common.tiny_problem(), "sgd:lr=0.1", steps=4, keep_checkpoints=0)


def test_sigkill_at_random_moments_then_resume_is_identical(tmp_path):
    """OPTISCOPE_KILLS=12 for the full audit (12 SIGKILLs at random moments); the suite runs 2."""
    import random

    n = int(os.environ.get("OPTISCOPE_KILLS", "2"))
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    clean = tmp_path / "clean"
    run_compare(CFG, clean)
    identical = killed = 0
    for i in range(n):
        d = tmp_path / f"k{i}"
        proc = subprocess.Popen([sys.executable, "-m", "optiscope.cli.main", "compare", "--config",
                                 str(_write_cfg(tmp_path)), "--out", str(d), "--quiet"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not (d / "checkpoints").is_dir() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 2.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
        r = invoke("resume", d, "--quiet")
        assert r.exit_code == 0, r.output
        if frame(d).equals(frame(clean)):
            identical += 1
    print(f"\nSIGKILL + resume: {identical} of {n} identical ({killed} killed mid-run)")
    assert identical == n, f"{identical} of {n} identical"


def _write_cfg(tmp_path: Path) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in CFG.to_dict().items()}))
    return p


def test_run_experiment_holds_the_writer_lock(tmp_path, monkeypatch):
    """While an experiment runs, its directory is locked: a reader's RunStore.open leaves its temporary files
    alone."""
    from optiscope.experiments import base
    from optiscope.utils.lock import is_locked

    seen = {}

    def fn(cfg, store):
        tmp = store.path(".results.json.abcd.tmp")
        tmp.write_bytes(b"partial")
        seen["locked"] = is_locked(store.root)
        RunStore.open(store.root)  # a reader meanwhile
        seen["tmp_kept"] = tmp.exists()
        tmp.unlink()
        return base.Result()

    spec = base.get("init_chain")
    monkeypatch.setitem(base._REGISTRY, "init_chain", base.ExperimentSpec(
        spec.name, spec.paper, spec.title, spec.config, spec.presets, fn))
    base.run_experiment("init_chain", "quick", out=tmp_path / "e")
    assert seen == {"locked": True, "tmp_kept": True}
    assert not is_locked(tmp_path / "e")
