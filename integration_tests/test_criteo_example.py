"""The Criteo-like DLRM example with RecD, FAE and DES on from one flag (examples/criteo/).

Run as a user runs it (subprocesses): ``--profile`` writes FAE's hot set; ``--compare`` trains
plugin off and on from the same weights and the losses agree; under ``torchrun`` at 2 gloo
ranks the same flag shards the model with TorchRec's planner (the DES module by DES's sharder,
the plugin's hints explained), trains, and the plugin-off run from the same command gives the
same losses (both sides start from the same weights: the DES module copies its slices of the
unsharded weights, and TorchRec's sharded tables are loaded from the unsharded ones below).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from two_ranks import HANG_GUARD_S, free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "criteo" / "train.py"
SMALL = ["--steps", "6", "--batch-size", "256", "--max-rows", "5000"]
SESSION = ",".join(f"C{i}" for i in range(1, 14))


def _flag(hot: Path) -> str:
    return (f"groups.session.features={SESSION}; towers.session_tower=session; fae.hot_set={hot}; "
            "des.sharding=table_wise; probe_batches=0")


def _run(cmd: List[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("RECD_PLUGIN", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def _losses(path: Path) -> List[float]:
    return [float(v) for v in path.read_text().split()]


def test_all_three_techniques_from_one_flag_unsharded_match_plain(tmp_path: Path) -> None:
    out = _run([sys.executable, str(TRAIN), "--profile", str(tmp_path / "fae"), *SMALL], tmp_path)
    hot = tmp_path / "fae" / "hot.npz"
    assert hot.exists() and "hot set:" in out
    # force_layout: on this cpu-only machine FAE would otherwise (rightly) leave the tables as they are
    out = _run([sys.executable, str(TRAIN), "--recd", _flag(hot) + "; fae.force_layout=true", "--compare", *SMALL],
               tmp_path)
    diff = re.search(r"max \|loss difference\| ([\d.e+-]+)", out)
    assert diff and float(diff.group(1)) < 1e-5, out
    assert "fae left on" not in out


def test_the_shipped_toml_flag_parses_with_all_three_sections() -> None:
    import recd_plugin

    config = recd_plugin.RecDConfig.load(f"@{ROOT / 'examples' / 'criteo' / 'recd.toml'}")
    assert [type(p).__name__ for p in config.parts()] == ["RecDConfig", "FAEConfig", "DESConfig"]
    assert config.towers == {"session_tower": "session"}


@pytest.mark.parametrize("pipeline", [False, True], ids=["loop", "train_pipeline_sparse_dist"])
def test_all_three_techniques_sharded_at_two_ranks_train_like_plugin_off(tmp_path: Path, pipeline: bool) -> None:
    _run([sys.executable, str(TRAIN), "--profile", str(tmp_path / "fae"), *SMALL], tmp_path)
    runs = {}
    for side, flag in (("off", "off"), ("on", _flag(tmp_path / "fae" / "hot.npz"))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TRAIN),
               "--recd", flag, "--losses", str(tmp_path / f"{side}.txt"), *SMALL] + (["--pipeline"] if pipeline else [])
        out = _run(cmd, tmp_path)
        runs[side] = [_losses(tmp_path / f"{side}.txt"), _losses(tmp_path / f"{side}.txt.rank1")]
        if side == "on":
            assert "des: table_wise" in out and "session_tower.ebc.s_C1" in out, out[-3000:]
            assert "fae: no placement hints on cpu" in out, out[-3000:]
            assert "w_C14" in out and "planned with those" in out  # the 1-dim tables' constraints, narrowed
    for rank in (0, 1):
        off, on = runs["off"][rank], runs["on"][rank]
        assert len(on) == len(off) == 6 and all(math.isfinite(v) for v in on)
        assert max(abs(a - b) for a, b in zip(off, on)) < 1e-4, (rank, off, on)
