"""``optiscope reproduce``: Ray jobs, resumability (including a SIGKILL of the command), failure recording, selection
by paper key or short name, and bad input (exit code 2 with a clear message).

One local Ray session (2 CPUs) serves the whole module; the experiments are the test-only fakes of
``tests/reproduce_fakes.py`` (deterministic numbers, a figure, two claims each; one that raises).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

TESTS = Path(__file__).resolve().parent
PY = sys.executable


@pytest.fixture(scope="module")
def fakes():
    sys.path.insert(0, str(TESTS))
    import reproduce_fakes

    importlib.reload(reproduce_fakes)
    yield reproduce_fakes
    reproduce_fakes.unregister()


@pytest.fixture(scope="module")
def ray_session():
    from optiscope.lab.pool import start_pool, stop_pool

    pool = start_pool(workers=2)
    yield pool
    stop_pool(pool)


def _claims(out: Path) -> list[dict]:
    return json.loads((out / "claims.json").read_text())


def test_select_by_paper_key_and_short_name(fakes):
    from optiscope.experiments.reproduce import select_experiments

    by_key = [s.name for s in select_experiments(papers=["004"])]
    by_name = [s.name for s in select_experiments(papers=["Velikanov et al. 2023"])]
    by_loose = [s.name for s in select_experiments(papers=["velikanov et al 2023"])]
    assert by_key == by_name == by_loose
    assert {"tfake_gamma", "tfake_delta", "sgd_phase_diagram"} <= set(by_key)
    assert "tfake_alpha" not in by_key
    both = [s.name for s in select_experiments(papers=["004"], only=["tfake_gamma", "sgd_phase_diagram"])]
    assert both == ["sgd_phase_diagram", "tfake_gamma"]
    with pytest.raises(ValueError, match="valid: .*Jiang et al. 2023"):
        select_experiments(papers=["Smith et al. 2099"])
    with pytest.raises(ValueError, match="unknown experiment 'nope'; valid: .*rmed_lm"):
        select_experiments(only=["nope"])


def test_runs_records_failure_and_resumes(fakes, ray_session, tmp_path):
    from optiscope.experiments.reproduce import reproduce
    from optiscope.lab.store import RunStore

    out = tmp_path / "all"
    sel = ["tfake_alpha", "tfake_delta", fakes.FAIL]
    events = []
    res = reproduce(out, only=sel, workers=2, on_event=lambda n, ev, info: events.append((n, ev)))
    assert res.failed == [fakes.FAIL]
    assert res.experiments["tfake_alpha"]["status"] == "finished"
    assert "failed on purpose" in res.experiments[fakes.FAIL]["error"]
    m = RunStore.open(out / fakes.FAIL).read_manifest()
    assert m["status"] == "failed" and "failed on purpose" in m["error"] and "Traceback" in m["traceback"]
    assert {(n, "done") for n in sel} <= set(events)
    rows = _claims(out)
    assert [r["experiment"] for r in rows] == ["tfake_alpha"] * 2 + ["tfake_delta"] * 2
    # alpha draws N(0,1) - 2 with seed 0: 0.1257 - 2 < -0.5, so "positive" does not hold; delta: +1.1257 holds
    assert rows[0]["holds"] is False and rows[2]["holds"] is True
    assert rows[1]["holds"] is None and rows[1]["reason"] == "premise absent"
    assert rows[0]["paper_name"] == "Jiang et al. 2023" and rows[0]["tier"] == "quick"
    mtime = (out / "tfake_alpha" / "results.json").stat().st_mtime_ns
    # a killed one (status still "running") is run again, finished ones are kept, the failed one is retried
    store = RunStore.open(out / "tfake_delta")
    store.set_status("running")
    (out / "tfake_delta" / "results.json").unlink()
    res2 = reproduce(out, only=sel, workers=2)
    assert res2.kept == ["tfake_alpha"]
    assert (out / "tfake_alpha" / "results.json").stat().st_mtime_ns == mtime
    assert res2.experiments["tfake_delta"]["status"] == "finished"
    assert res2.experiments["tfake_delta"]["previous"] == "killed"
    assert res2.failed == [fakes.FAIL]
    assert _claims(out) == rows


def test_parallel_equals_sequential(fakes, ray_session, tmp_path):
    from optiscope.experiments.reproduce import reproduce

    sel = ["tfake_beta", "tfake_gamma", "tfake_eps"]
    a = reproduce(tmp_path / "par", only=sel, workers=2)
    b = reproduce(tmp_path / "seq", only=sel, parallel=False)
    assert a.claims == b.claims and len(a.claims) == 6
    assert json.loads((tmp_path / "seq" / "reproduce.json").read_text())["pool"].startswith("in process")


def test_bad_output_directory_and_preset(fakes, tmp_path):
    from optiscope.experiments.reproduce import reproduce

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds something else .*notes.txt"):
        reproduce(other, only=["tfake_alpha"], parallel=False)
    assert (other / "notes.txt").read_text() == "mine"
    out = tmp_path / "r"
    reproduce(out, only=["tfake_alpha"], parallel=False)
    with pytest.raises(ValueError, match="holds a --preset quick reproduction"):
        reproduce(out, only=["tfake_alpha"], preset="full", parallel=False)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        reproduce(tmp_path / "r2", only=["tfake_alpha"], preset="huge", parallel=False)
    from optiscope.lab.pool import PoolError

    with pytest.raises(PoolError, match="workers = 0"):
        reproduce(tmp_path / "r3", only=["tfake_alpha"], workers=0)


def test_cli_bad_input_exits_2(fakes, tmp_path):
    from optiscope.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["reproduce", "--only", "no_such_exp", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "unknown experiment 'no_such_exp'" in r.output and "rmed_lm" in r.output
    r = runner.invoke(app, ["reproduce", "--papers", "Nobody 1999", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "unknown paper" in r.output and "Velikanov et al. 2023" in r.output
    r = runner.invoke(app, ["reproduce", "--workers", "0", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--workers 0" in r.output
    r = runner.invoke(app, ["reproduce", "--only", "tfake_alpha", "--device", "cuda:7", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "cuda:7" in r.output
    r = runner.invoke(app, ["reproduce", "--only", "tfake_alpha", "--device", "tpu", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "unknown device 'tpu'" in r.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.csv").write_text("1")
    r = runner.invoke(app, ["reproduce", "--only", "tfake_alpha", "--out", str(tmp_path / "busy")])
    assert r.exit_code == 2 and "holds something else" in r.output
    assert not (tmp_path / "a").exists()


def _cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    code = ("import sys; sys.path.insert(0, %r); import reproduce_fakes; from optiscope.cli.main import app; "
            "sys.argv = ['optiscope'] + sys.argv[1:]; app()") % str(TESTS)
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([PY, "-c", code, *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


@pytest.mark.parametrize("address, max_seconds", [
    ("127.0.0.1:1", 40),  # refused at once
    pytest.param("10.255.255.1:6379", 45, marks=pytest.mark.slow),  # no answer: the --ray-timeout must fire
])
def test_cli_unreachable_ray_address_is_a_clear_error(fakes, tmp_path, address, max_seconds):
    t0 = time.time()
    p = _cli(["reproduce", "--only", "tfake_alpha", "--ray-address", address, "--ray-timeout", "5",
              "--out", str(tmp_path / "x")])
    try:
        out, err = p.communicate(timeout=max_seconds + 30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"reproduce --ray-address {address} hung")
    assert p.returncode == 2, (out, err)
    assert f"cannot reach a Ray cluster at '{address}'" in err
    assert time.time() - t0 < max_seconds
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # two CLI processes with Ray start-up: about 1 min idle, 4 min on the loaded shared machine
def test_sigkill_then_same_command_keeps_finished_and_ends_with_same_claims(fakes, ray_session, tmp_path):
    """Kill the whole `optiscope reproduce` process group with SIGKILL after two experiments finished, run the
    same command again: the finished ones are kept untouched, the rest run, and the claims table equals that of
    an uninterrupted run."""
    from optiscope.experiments.reproduce import experiment_state, reproduce

    sel = ",".join(fakes.NAMES)
    out = tmp_path / "killed"
    args = ["reproduce", "--only", sel, "--workers", "2", "--quiet", "--out", str(out)]
    p = _cli(args, env={"TFAKE_SLEEP": "3"})
    deadline = time.time() + 240
    done: list[str] = []
    while time.time() < deadline and p.poll() is None:
        done = [n for n in fakes.NAMES if experiment_state(out / n, "quick") == "finished"]
        if len(done) >= 2:
            break
        time.sleep(0.2)
    assert p.poll() is None, f"reproduce ended before it could be killed: {p.communicate()}"
    assert len(done) >= 2, "no two experiments finished within the deadline"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    time.sleep(1.0)
    kept = {n: (out / n / "results.json").read_bytes() for n in done}
    mtimes = {n: (out / n / "results.json").stat().st_mtime_ns for n in done}
    unfinished = [n for n in fakes.NAMES if n not in done]
    assert unfinished, "everything finished before the kill"
    p2 = _cli(args, env={"TFAKE_SLEEP": "0"})
    o, e = p2.communicate(timeout=300)
    assert p2.returncode == 0, (o, e)
    for n in done:
        assert (out / n / "results.json").read_bytes() == kept[n]
        assert (out / n / "results.json").stat().st_mtime_ns == mtimes[n]
    marker = json.loads((out / "reproduce.json").read_text())
    assert sorted(marker["sessions"][-1]["kept"]) == sorted(done)
    assert all(marker["experiments"][n]["status"] == "finished" for n in fakes.NAMES)
    ref = reproduce(tmp_path / "uninterrupted", only=fakes.NAMES, parallel=False)  # = parallel, see above
    assert _claims(out) == ref.claims and len(ref.claims) == 2 * len(fakes.NAMES)
    assert (out / "index.html").exists()


def test_longest_first_rule():
    from optiscope.experiments.reproduce import longest_first

    exp = {"a": 10.0, "b": None, "c": 300.0, "d": 10.0}
    # unknown first (it may be the longest), then by decreasing expected time, ties by name
    assert longest_first(["a", "b", "c", "d"], exp) == ["b", "c", "a", "d"]


def test_measured_durations_order_the_next_run(fakes, tmp_path, monkeypatch):
    """A finished job's time goes to the user's cache; the next reproduction starts the longest job first; the
    user's cache wins over the shipped hints; update_duration_hints merges a reproduction's times into a file."""
    from optiscope.experiments import reproduce as rp

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"seconds": {"quick": {"tfake_beta": 1.0, "tfake_gamma": 500.0}}}))
    monkeypatch.setattr(rp, "DURATIONS", shipped)
    sel = ["tfake_beta", "tfake_gamma", "tfake_eps"]
    assert rp.expected_seconds(sel, "quick") == {"tfake_beta": 1.0, "tfake_gamma": 500.0, "tfake_eps": None}
    started: list[str] = []
    rp.reproduce(tmp_path / "one", only=sel, parallel=False,
                 on_event=lambda n, ev, info: started.append(n) if ev == "started" else None)
    assert started == ["tfake_eps", "tfake_gamma", "tfake_beta"]
    cache = json.loads((tmp_path / "cache" / "optiscope" / "durations.json").read_text())["seconds"]["quick"]
    assert set(cache) == set(sel) and all(v > 0 for v in cache.values())
    # the cache now knows all three: measured times replace the shipped guesses
    cache = {"tfake_beta": 9.0, "tfake_gamma": 2.0, "tfake_eps": 5.0}
    (tmp_path / "cache" / "optiscope" / "durations.json").write_text(json.dumps({"seconds": {"quick": cache}}))
    started.clear()
    rp.reproduce(tmp_path / "two", only=sel, parallel=False,
                 on_event=lambda n, ev, info: started.append(n) if ev == "started" else None)
    assert started == ["tfake_beta", "tfake_eps", "tfake_gamma"]
    marker = json.loads((tmp_path / "two" / "reproduce.json").read_text())
    assert marker["experiments"]["tfake_beta"]["expected_seconds"] == 9.0
    merged = rp.update_duration_hints(tmp_path / "two", shipped)
    assert set(merged["quick"]) == set(sel)
    assert json.loads(shipped.read_text())["seconds"]["quick"]["tfake_eps"] == merged["quick"]["tfake_eps"]
