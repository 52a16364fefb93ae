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

from two_ranks import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "movielens"


def _torchx(args, cwd: Path) -> str:
    bin_dir = str(Path(sys.executable).parent)  # torchx local_cwd needs torchrun on PATH
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("RECD_PLUGIN", None)
    proc = subprocess.run([sys.executable, "-m", "torchx.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_builtins_list_recd_train_and_torchx_own() -> None:
    out = _torchx(["builtins"], ROOT)
    for name in ("recd.train", "dist.ddp", "utils.echo", "serve.torchserve", "metrics.tensorboard"):
        assert name in out, (name, out)


def test_local_cwd_launch_turns_the_plugin_on_sharded_on_two_ranks() -> None:
    out = _torchx(["run", "recd.train", "--script", "train.py", "--recd", "@recd.toml", "-j", "1x2", "--",
                   "--data", "synthetic", "--epochs", "1", "--max-steps", "2", "--workers", "0", "--light"], EXAMPLE)
    assert "Job finished: SUCCEEDED" in out, out[-4000:]
    assert "recd-plugin sharding plan:" in out, out[-4000:]  # DistributedModelParallel, planner-made plan
    assert out.count("recd-plugin: 2048 samples") == 2, out[-4000:]  # both ranks deduplicated


def test_gpu_cluster_dry_run_has_image_resources_and_nccl() -> None:
    out = _torchx(["run", "--workspace", "", "--dryrun", "-s", "slurm", "recd.train", "--script", "train.py",
                   "--recd", "@recd.toml", "-j", "2x8", "--gpu", "8", "--image", "registry.example.com/recd:1"], EXAMPLE)
    assert "'image': 'registry.example.com/recd:1'" in out, out
    assert "'gpu': 8" in out and "--gpus-per-task=8" in out, out
    assert "RECD_DIST_BACKEND=nccl" in out and "RECD_PLUGIN=@recd.toml" in out, out
    assert "--nnodes 2 --nproc_per_node 8" in out, out
