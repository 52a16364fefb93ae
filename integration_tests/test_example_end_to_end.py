"""End to end: the example script and the benchmark run as a user runs them (subprocesses).

* ``train.py --compare`` on the synthetic data, with a DataLoader worker (so the IKJT is
  built in the worker process): both runs finish and their losses and AUCs agree;
* the same script with the plugin switched on only through ``$RECD_PLUGIN`` (how a TorchX
  launcher passes it) and through a TOML file;
* ``python -m recd_plugin.bench dedup --quick --json``: the JSON has every key of the issue
  and the plugin's losses match plain TorchRec (no timing is asserted: tests check
  correctness, benchmarks measure).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from two_ranks import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "movielens" / "train.py"


def _run(args, env=None, timeout=HANG_GUARD_S) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_compare_on_synthetic_data_matches_plain() -> None:
    out = _run([str(TRAIN), "--data", "synthetic", "--compare", "--epochs", "1", "--max-steps", "8",
                "--workers", "1", "--batch-size", "512"])
    rows = dict(re.findall(r"^(plain TorchRec|recd-plugin)\s+\d+\s+([\d.]+)\s+[\d.]+$", out, re.M))
    assert set(rows) == {"plain TorchRec", "recd-plugin"}, out
    assert abs(float(rows["plain TorchRec"]) - float(rows["recd-plugin"])) <= 1e-4
    diff = re.search(r"\|loss diff\| ([\d.e+-]+); \|AUC diff\| ([\d.e+-]+)", out)
    assert diff and float(diff.group(1)) < 1e-5 and float(diff.group(2)) < 1e-4, out


@pytest.mark.parametrize("how", ["env", "toml"])
def test_plugin_switched_on_without_changing_the_command(how: str) -> None:
    args = [str(TRAIN), "--data", "synthetic", "--epochs", "1", "--max-steps", "3", "--workers", "0", "--light"]
    light_flag = ("groups.user.key=session_id; groups.user.features=user_id,user_age,user_gender,"
                  "user_occupation,user_zip,history; towers.user_tower=user")
    if how == "env":
        out = _run(args, env={"RECD_PLUGIN": light_flag})
    else:
        toml = ROOT / "examples" / "movielens" / "recd.toml"
        out = _run(args[:-1] + ["--recd", f"@{toml}"])  # the TOML's tower is the transformer model's user_tower
    assert "recd-plugin:" in out and "unique user rows" in out, out


def test_dedup_benchmark_quick_json(tmp_path: Path) -> None:
    path = tmp_path / "dedup.json"
    _run(["-m", "recd_plugin.bench", "dedup", "--quick", "--no-docs", "--json", str(path)])
    result = json.loads(path.read_text())
    assert set(result["variants"]) == {"transformer", "light"}
    for name, v in result["variants"].items():
        for key in ("ratio", "bound", "unique_fraction", "build_pct", "max_loss_diff"):
            assert isinstance(v[key], float), (name, key)
        assert v["max_loss_diff"] <= 1e-5, (name, v["max_loss_diff"])
        assert v["max_weight_diff"] <= 1e-4, (name, v["max_weight_diff"])
        assert 0.0 < v["unique_fraction"] < 0.1, (name, v["unique_fraction"])
