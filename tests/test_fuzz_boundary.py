"""Generated malformed input at the boundary (hypothesis): specs, configs, config files, spectra, CLI arguments and
API arguments. Properties: no traceback (only the documented ``ValueError`` family / ``StoreError`` in the API, exit
code 2 with a one-line ``error:`` on the CLI), and no silent acceptance of NaN, infinity or fractional counts.

``test_zz_enough_inputs`` checks that at least 300 inputs were generated in the module (run the whole file)."""

from __future__ import annotations

import math
import string
import tempfile
from pathlib import Path

import pytest
import test_lab_common  # noqa: F401  (single-threaded torch)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from optiscope.cli.main import app
from optiscope.lab import Run, StoreError, compare
from optiscope.lab.config import CompareConfig
from optiscope.lab.probes import make_probes, split_probe_specs
from optiscope.lab.run import count_arg, lr_factor_fn
from optiscope.utils.config import ConfigError
from optiscope.utils.spec import SpecError, parse_spec

N = 30  # examples per strategy: many small strategies keep the module fast and broad
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COUNT = {"n": 0, "cli": 0}
CLEAN = (ValueError, StoreError)  # ConfigError, SpecError and SpectrumError are ValueErrors
TINY = ["--model", "mlp:depth=2,width=8", "--data", "digits:n_train=60,n_test=20", "--steps", "2", "--batch",
        "30", "--probe-every", "1", "--quiet"]

bad_numbers = st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999", "-1e999", "2.7", "0.5", "-3.5", "1e-9"])
bad_floats = st.sampled_from([math.nan, math.inf, -math.inf, 2.7, 0.5, -1.5, 1e-300])
junk_text = st.text(alphabet=string.printable + "äé\u00a0\u202e", max_size=40)
tokens = st.one_of(junk_text, bad_numbers, st.sampled_from(["", ":", "=", ",", "[", "]", "[1,", "a=", "=1", "::",
                                                             "a=b=c", "lr=", "lr=[nan]", "k=[1,2"]))


def seen(cli: bool = False) -> None:
    COUNT["n"] += 1
    COUNT["cli"] += cli


def invoke(args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    out = r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"traceback for {args}: {type(r.exception).__name__}: {r.exception}"
    assert "Traceback" not in out, out
    return r


def expect_clean_error(fn, *a, **k):
    """Call ``fn``; it may succeed or raise a documented error, nothing else."""
    try:
        return fn(*a, **k)
    except CLEAN:
        return None


# ---------------------------------------------------------------------------------------------------- specs
@FUZZ
@given(name=st.sampled_from(["adam", "sgd", "sgdm", "rmsprop", "adamw", "", "ADAM", "adam "]),
       key=st.sampled_from(["lr", "momentum", "betas", "eps", "weight_decay", "foo", ""]), value=tokens)
def test_optimizer_specs_in_a_config(name, key, value):
    seen()
    spec = f"{name}:{key}={value}"
    cfg = expect_clean_error(CompareConfig, optimizers=(spec,), probes=("loss",))
    low = value.strip().lower()
    if cfg is not None and low in ("nan", "inf", "-inf", "1e999", "-1e999"):
        pytest.fail(f"accepted non-finite optimizer spec {spec!r}")


@FUZZ
@given(key=st.sampled_from(["depth", "width", "gain", "activation", "bias", "init", "seed", "zzz"]), value=tokens)
def test_model_specs(key, value):
    seen()
    from optiscope.zoo import build_model, load_dataset

    ds = load_dataset("digits:n_train=40,n_test=10")
    spec = f"mlp:{key}={value}"
    model = expect_clean_error(build_model, spec, dataset=ds)
    if model is not None:
        import torch

        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), f"{spec} built non-finite weights"
        if key in ("depth", "width"):
            assert not any(c in value for c in ".en") or float(value).is_integer(), f"fractional {spec} accepted"


@FUZZ
@given(key=st.sampled_from(["n_train", "n_test", "seed", "noise", "zzz"]), value=tokens)
def test_dataset_specs(key, value):
    seen()
    from optiscope.zoo import load_dataset

    ds = expect_clean_error(load_dataset, f"digits:{key}={value}")
    if ds is not None and value.strip().lower() in ("nan", "inf", "-inf", "2.7", "0.5", "-3.5"):
        pytest.fail(f"accepted digits:{key}={value}")


@FUZZ
@given(text=st.one_of(junk_text, st.lists(tokens, max_size=4).map(",".join)))
def test_probe_lists_and_lr_schedules(text):
    seen()
    try:
        specs = split_probe_specs(text)
        make_probes(specs)
    except CLEAN:
        pass
    try:
        f = lr_factor_fn(text, 10)
        if f is not None:
            assert math.isfinite(f(3))
    except CLEAN:
        pass
    try:
        parse_spec(text, None, "spec")
    except SpecError:
        pass


# ---------------------------------------------------------------------------------------------------- configs
int_fields = ["steps", "batch_size", "probe_every", "seed", "probe_size", "accumulation_chunks"]


@FUZZ
@given(field=st.sampled_from(int_fields), value=st.one_of(bad_floats, st.booleans(), junk_text,
                                                          st.integers(-5, 0)))
def test_fractional_or_non_finite_counts_are_refused_in_configs(field, value):
    seen()
    if field in ("seed", "accumulation_chunks") and isinstance(value, int) and not isinstance(value, bool):
        value = 0.5  # seed 0 / -3 and accumulation_chunks <= 0 are covered by other fields' ranges
    with pytest.raises(ConfigError):
        CompareConfig.from_dict({field: value})


@FUZZ
@given(field=st.sampled_from(["divergence_factor", "device", "dtype", "probes", "optimizers", "names",
                              "probe_steps", "lr_schedule", "full_batch"]),
       value=st.one_of(bad_floats, junk_text, st.lists(junk_text, max_size=3), st.none()))
def test_other_config_fields(field, value):
    seen()
    cfg = expect_clean_error(CompareConfig.from_dict, {field: value})
    if cfg is not None and field == "divergence_factor":
        assert cfg.divergence_factor is None or math.isfinite(cfg.divergence_factor)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), junk_text.map(str.encode),
                      st.sampled_from([b"steps: [1\n", b"!!python/object/apply:os.system ['true']\n", b"- 1\n- 2\n",
                                       b"steps: 2.7\n", b"steps: .nan\n", b"seed: .inf\n", b"{1: 2}\n",
                                       b"probes: []\n", b"\xff\xfe\x00", b"model: !!binary aGVsbG8=\n"])),
       suffix=st.sampled_from([".yaml", ".yml", ".toml", ".json", ".txt"]))
def test_config_files(data, suffix):
    seen()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"c{suffix}"
        p.write_bytes(data)
        try:
            CompareConfig.from_file(p)
        except ConfigError as e:
            assert str(p) in str(e) or "field" in str(e), str(e)
        except ValueError:
            pass


# ---------------------------------------------------------------------------------------------------- API
api_values = st.one_of(bad_floats, st.booleans(), st.sampled_from(["3", None, [2], -1]))


@FUZZ
@given(arg=st.sampled_from(["steps", "batch_size", "probe_every", "keep_checkpoints", "accumulation_chunks", "seed"]),
       value=api_values)
def test_run_arguments(arg, value):
    seen()
    if value is None and arg in ("keep_checkpoints", "accumulation_chunks"):
        value = 2.5
    if arg == "seed" and value == -1:
        value = 1.5
    with pytest.raises(ValueError):
        Run(test_lab_common.tiny_problem(), "sgd:lr=0.1", **{"steps": 3, arg: value})


@FUZZ
@given(steps=st.one_of(bad_floats, st.sampled_from(["2", None, True])))
def test_compare_steps(steps):
    seen()
    with pytest.raises(ValueError, match="steps"):
        compare(test_lab_common.tiny_problem(), {"a": "sgd:lr=0.1"}, steps=steps)


@FUZZ
@given(value=st.one_of(bad_floats, st.booleans(), st.just("x"), st.integers(-3, 0)))
def test_count_arg(value):
    seen()
    with pytest.raises(ValueError):
        count_arg("n", value, 1)


# ---------------------------------------------------------------------------------------------------- CLI
bad_cli = st.one_of(
    st.tuples(st.just("--steps"), st.sampled_from(["2.7", "abc", "", "-1", "0", "nan"])),
    st.tuples(st.just("--batch"), st.sampled_from(["0", "1.5", "x"])),
    st.tuples(st.just("--probes"), st.sampled_from(["", ",", "loss,,", "rmed", "r_med:per_layer=nan",
                                                     "r_med:per_layer=2.5", "loss:x=1"])),
    st.tuples(st.just("--opt"), tokens.map(lambda t: f"adam:lr={t}" if t not in ("1e-9",) else "adam:lr=nan")),
    st.tuples(st.just("--model"), st.sampled_from(["mlp:gain=nan", "mlp:width=2.5", "mlp:depth=inf", "", ":",
                                                    "mlp:width=", "resnet9"])),
    st.tuples(st.just("--set"), st.sampled_from(["steps=2.7", "seed=nan", "probes=", "divergence_factor=inf",
                                                  "divergence_factor=0.5", "device=tpu", "kind=compare", "=1", "x"])),
    st.tuples(st.just("--device"), st.sampled_from(["tpu", "cuda", "cuda:7", "gpu", "", "CPU:0"])),
    st.tuples(st.just("--keep-checkpoints"), st.sampled_from(["0", "-1", "2.5", "x"])),
    st.tuples(st.just("--config"), st.sampled_from(["/nonexistent.yaml", "/", "/etc/hostname"])),
)


@FUZZ
@given(bad=bad_cli, extra=st.lists(st.sampled_from([("--seed", "1"), ("--probe-every", "1"), ("--full-batch",)]),
                                   max_size=2))
def test_compare_cli_usage_errors(bad, extra, tmp_path):
    seen(cli=True)
    args = ["compare", *TINY, *[a for e in extra for a in e], *bad, "--out", tmp_path / "o"]
    r = invoke(args)
    assert r.exit_code == 2, (args, r.output)
    assert "error" in r.output.lower() or "usage" in r.output.lower(), r.output
    assert not (tmp_path / "o" / "checkpoints").exists(), "a refused command must not start training"


spectra = st.one_of(
    st.sampled_from(["", " ", "powerlaw", "powerlaw:nu=nan,kappa=1,n=10", "powerlaw:nu=2,kappa=inf,n=10",
                     "powerlaw:nu=2,kappa=1,n=2.5", "powerlaw:nu=2,kappa=1,n=-3", "powerlaw:nu=x,kappa=1,n=10",
                     "powerlaw:nu=2,kappa=1,n=10,scale=inf", "powerlaw:nu=2,kappa=1,n=10,zz=1", ".", "/",
                     "/nonexistent.npz"]),
    junk_text)


@FUZZ
@given(spec=spectra, lr=st.sampled_from(["0.1", "nan", "inf"]), batch=st.sampled_from(["4", "0", "2.5"]))
def test_sgd_theory_spectrum_argument(spec, lr, batch):
    seen(cli=True)
    r = invoke(["sgd-theory", "--spectrum", spec, "--lr", lr, "--batch", batch, "--steps", "20", "--quiet"])
    assert r.exit_code == 2, (spec, lr, batch, r.output)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.sampled_from([b"eigenvalues: [1, 2]\n", b"PK\x03\x04garbage",
                                                                b"\x93NUMPY\x01\x00garbage"])),
       flag=st.sampled_from(["--spectrum", "--kernel"]))
def test_sgd_theory_files_that_are_not_npz(data, flag, tmp_path):
    seen(cli=True)
    p = tmp_path / "x.npz"
    p.write_bytes(data)
    r = invoke(["sgd-theory", flag, p, "--lr", "0.1", "--batch", "4", "--steps", "10", "--quiet"])
    assert r.exit_code == 2 and str(p) in " ".join(r.output.split()).replace(" ", "") or str(p) in r.output, r.output


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzrun") / "r"
    r = CliRunner().invoke(app, ["compare", *TINY, "--opt", "sgd:lr=0.1", "--probes", "loss", "--out", str(d)])
    assert r.exit_code == 0, r.output
    return d


@FUZZ
@given(target=st.sampled_from(["config.yaml", "manifest.json", "metrics.parquet", "results.json"]),
       data=st.one_of(st.binary(min_size=1, max_size=200), st.sampled_from([b"[]", b"null", b"{", b"1", b"\xcd"])),
       command=st.sampled_from(["show", "plot", "resume"]))
def test_show_plot_resume_on_damaged_files(finished_run, target, data, command, tmp_path):
    import shutil

    seen(cli=True)
    d = tmp_path / "copy"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(finished_run, d)
    (d / target).write_bytes(data)
    r = invoke([command, d] + (["--quiet"] if command == "resume" else []))
    text = " ".join(r.output.split())
    if command in ("show", "plot"):
        assert r.exit_code in (0, 2), text
        if r.exit_code == 0 and target != "results.json" and data not in (b"null",):
            assert target in text or "warning" in text.lower() or target == "metrics.parquet", text
    else:
        assert r.exit_code in (0, 2), text
        if r.exit_code == 2:
            assert target in text or "config" in text, text


@FUZZ
@given(args=st.lists(st.sampled_from(["--steps", "2.7", "--zzz", "-", "--", "--out", "nan", "--json",
                                       "--device", "--keep-checkpoints", "0"]), min_size=1, max_size=4))
def test_resume_and_show_argument_garbage(args, tmp_path):
    seen(cli=True)
    for cmd in ("resume", "show"):
        r = invoke([cmd, *args])
        assert r.exit_code == 2, (cmd, args, r.output)


def test_zz_enough_inputs():
    """The module generated at least 300 bad inputs (only meaningful when the whole module ran)."""
    if COUNT["n"] < 5 * N:
        pytest.skip("run the whole module for the count")
    print(f"\nfuzz inputs: {COUNT['n']} (CLI: {COUNT['cli']})")
    assert COUNT["n"] >= 300
