"""The TorchX component launches the unchanged example script with the plugin on (local_cwd).

``recd.train`` is registered under the ``torchx.components`` entry point; TorchX's own
builtins must still be listed. The flag travels only through the component's ``--recd`` (as
``$RECD_PLUGIN``); the script's own arguments do not mention the plugin, yet it reports the
plugin's dedup statistics. examples/movielens/.torchxconfig selects the local_cwd scheduler.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "movielens"


def _torchx(args, cwd: Path) -> str:
    bin_dir = str(Path(sys.executable).parent)  # torchx local_cwd needs torchrun on PATH
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("RECD_PLUGIN", None)
    proc = subprocess.run([sys.executable, "-m", "torchx.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_builtins_list_recd_train_and_torchx_own() -> None:
    out = _torchx(["builtins"], ROOT)
    for name in ("recd.train", "dist.ddp", "utils.echo", "serve.torchserve", "metrics.tensorboard"):
        assert name in out, (name, out)


def test_local_cwd_launch_turns_the_plugin_on() -> None:
    out = _torchx(["run", "recd.train", "--script", "train.py", "--recd", "@recd.toml", "-j", "1x1", "--",
                   "--data", "synthetic", "--epochs", "1", "--max-steps", "2", "--workers", "0"], EXAMPLE)
    assert "Job finished: SUCCEEDED" in out, out[-4000:]
    assert "recd-plugin: 2048 samples" in out, out[-4000:]
