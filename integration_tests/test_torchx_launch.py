"""The TorchX component launches the unchanged example script with the plugin on (local_cwd).

The flag travels only through ``--recd`` of the component (as ``$RECD_PLUGIN``); the script's
own arguments do not mention the plugin, yet it reports the plugin's dedup statistics.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_local_cwd_launch_turns_the_plugin_on() -> None:
    bin_dir = str(Path(sys.executable).parent)  # torchx local_cwd needs torchrun on PATH
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("RECD_PLUGIN", None)
    cmd = [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
           "torchx_components/recd.py:train", "--script", "examples/movielens/train.py",
           "--recd", "@examples/movielens/recd.toml", "-j", "1x1", "--",
           "--data", "synthetic", "--epochs", "1", "--max-steps", "2", "--workers", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Job finished: SUCCEEDED" in out, out[-4000:]
    assert "recd-plugin: 2048 samples" in out, out[-4000:]
