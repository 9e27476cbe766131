"""examples/ run as scripts (tiny settings: OPTISCOPE_EXAMPLE_TINY=1) and write run stores that the lab reads."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optiscope.lab import RunStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPTISCOPE_EXAMPLE_TINY": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--out", str(out)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


@pytest.mark.parametrize("name,metrics", [
    ("resnet18_sharpness", {"loss", "sharpness"}),
    ("own_loop_tracker", {"loss", "accuracy", "sharpness", "r_med", "precond_sharpness"}),
    pytest.param("gpt2_tracker_tensorboard", {"loss", "sharpness"}, marks=needs("transformers")),
    pytest.param("bert_compare", {"loss", "accuracy", "sharpness", "r_med"}, marks=needs("transformers")),
])
def test_example_runs_and_writes_a_store(name, metrics, tmp_path):
    proc = run_example(name, tmp_path / name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = RunStore.open(tmp_path / name).read_metrics()
    assert metrics <= set(df["metric"]), set(df["metric"])
    assert df[df["metric"] == "sharpness"]["value"].notna().all()
    if name == "gpt2_tracker_tensorboard":
        assert any((tmp_path / name / "tensorboard").glob("events.out.tfevents.*"))
    if name == "bert_compare":
        assert set(df["run"]) == {"sgdm", "adam"}
    if name == "resnet18_sharpness":
        assert "sharpness at init:" in proc.stdout


def test_local_resnet18_has_torchvisions_architecture():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from _resnet18 import ResNet18
    finally:
        sys.path.remove(str(EXAMPLES))
    model = ResNet18(num_classes=1000)
    # torchvision.models.resnet18(weights=None): 11,689,512 parameters; the same parameter names and shapes
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7) and shapes["fc.weight"] == (1000, 512)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1) and "layer1.0.downsample.0.weight" not in shapes
    assert len([k for k in shapes if k.endswith("num_batches_tracked")]) == 20
    try:
        from torchvision.models import resnet18
    except Exception as e:  # torchvision absent or built for another torch: the count above is its documented size
        pytest.skip(f"torchvision not importable here ({type(e).__name__}); compared with its documented size only")
    tv = {k: tuple(v.shape) for k, v in resnet18(weights=None).state_dict().items()}
    assert tv == shapes
