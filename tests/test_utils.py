from dataclasses import dataclass

import pytest

from optiscope.lab.store import RunStore, StoreError
from optiscope.utils.config import Config, ConfigError, require
from optiscope.utils.spec import SpecError, parse_spec


@dataclass(frozen=True)
class _Cfg(Config):
    seed: int = 0
    lr: float = 0.1
    widths: tuple[int, ...] = (1, 2)
    name: str = "a"

    def validate(self):
        require(self.lr > 0, "lr", self.lr, "> 0")


def test_config_coercion_and_overrides(tmp_path):
    c = _Cfg().with_overrides(["lr=0.5", "widths=3,4,5", "seed=2"])
    assert c.lr == 0.5 and c.widths == (3, 4, 5) and c.seed == 2
    with pytest.raises(ConfigError, match="'lr'"):
        _Cfg(lr=-1.0)
    with pytest.raises(ConfigError, match="unknown config field"):
        _Cfg().with_overrides(["nope=1"])
    with pytest.raises(ConfigError, match="malformed override"):
        _Cfg().with_overrides(["lr"])
    with pytest.raises(ConfigError, match="an integer"):
        _Cfg().with_overrides(["seed=abc"])
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.25\nwidths: [7]\n")
    assert _Cfg.from_file(p).widths == (7,)
    t = tmp_path / "c.toml"
    t.write_text("lr = 0.125\n")
    assert _Cfg.from_file(t).lr == 0.125


def test_parse_spec():
    assert parse_spec("adam:lr=1e-3,betas=[0.9,0.99]") == ("adam", {"lr": 1e-3, "betas": [0.9, 0.99]})
    assert parse_spec("mlp") == ("mlp", {})
    with pytest.raises(SpecError, match="valid: adam, sgd"):
        parse_spec("adamw:lr=1", ["sgd", "adam"], "optimizer")
    with pytest.raises(SpecError, match="token 'lr'"):
        parse_spec("adam:lr", None, "optimizer")


def test_store_roundtrip_and_corruption(tmp_path):
    s = RunStore(tmp_path / "run")
    s.write_config(_Cfg())
    s.update_manifest(status="running", seed=0)
    s.append_metrics([{"run": "r", "optimizer": "adam", "step": 0, "metric": "loss", "layer": None, "value": 1.0}])
    s.append_metrics([{"run": "r", "optimizer": "adam", "step": 1, "metric": "r_med", "layer": "w", "value": 2.0}])
    df = s.read_metrics()
    assert list(df["step"]) == [0, 1] and df["layer"].isna().tolist() == [True, False]
    s.write_arrays("a", x=[1, 2, 3])
    assert s.read_arrays("a")["x"].tolist() == [1, 2, 3]
    assert s.check() == []
    (tmp_path / "run" / "metrics.parquet").write_bytes(b"PAR1garbage")
    problems = s.check()
    assert len(problems) == 1 and "metrics.parquet" in problems[0]
    assert s.read_config()["lr"] == 0.1  # the valid data is kept
    with pytest.raises(StoreError, match="does not exist"):
        RunStore.open(tmp_path / "missing")
