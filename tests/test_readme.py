"""The README's code runs as written: every ```python block, in order, in one fresh interpreter (the blocks build on
each other like a tutorial); every `optiscope` command of the ```bash blocks names a real subcommand and real
options (checked against its --help), and every `make` target exists."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_the_blocks_it_promises():
    assert len(blocks("python")) >= 4
    assert "source .venv/bin/activate" in README and ".venv/bin/optiscope" in README


def test_python_blocks_run_verbatim(tmp_path):
    code = "\n\n".join(blocks("python"))
    script = tmp_path / "readme_blocks.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from optiscope.lab import RunStore

    for d in ("runs/mine-loop", "runs/mine"):
        df = RunStore.open(tmp_path / d).read_metrics()
        assert {"loss", "sharpness", "r_med"} <= set(df["metric"]), d


def shell_commands() -> list[list[str]]:
    out = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split(";"):
                part = part.strip()
                if part:
                    out.append(shlex.split(part))
    return out


def optiscope_exe() -> str:
    exe = Path(sys.executable).with_name("optiscope")
    return str(exe) if exe.exists() else "optiscope"


def test_shell_commands_name_real_subcommands_and_options():
    cmds = shell_commands()
    assert any(c[0] == "optiscope" for c in cmds)
    makefile = (ROOT / "Makefile").read_text()
    helps: dict[str, str] = {}
    for cmd in cmds:
        if cmd[0] == "make":
            for target in [t for t in cmd[1:] if "=" not in t]:
                assert re.search(rf"^{re.escape(target)}\s*:", makefile, flags=re.MULTILINE), f"make {target}: no such target"
            continue
        if cmd[0] != "optiscope":
            continue
        sub = cmd[1]
        if sub not in helps:
            proc = subprocess.run([optiscope_exe(), sub, "--help"], capture_output=True, text=True,
                                  env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}, timeout=300)
            assert proc.returncode == 0, f"optiscope {sub} --help failed: {proc.stderr[-500:]}"
            helps[sub] = proc.stdout
        for opt in [a.split("=", 1)[0] for a in cmd[2:] if a.startswith("--")]:
            assert opt in helps[sub], f"optiscope {sub}: option {opt} is not in its --help"

