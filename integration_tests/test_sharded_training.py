"""The example under DistributedModelParallel, 2 ranks on CPU (gloo), plugin off vs on.

``torchrun --nproc_per_node 2 examples/movielens/train.py --compare --sharding S`` trains the
same model (same weights, same per-rank batches) with plain TorchRec and with the plugin, SGD
for the dense part and fused EXACT_SGD for the sharded tables. Every step's loss on every
rank must agree to float tolerance, for TABLE_WISE, COLUMN_WISE and ROW_WISE (the plugin's
sharder offers it on CPU; its padding makes per-rank unique counts equal for gloo), with the
mean-pooled history (EBC in the user tower) and with the transformer (EmbeddingCollection in
the user tower). Each run is a subprocess with a timeout, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "movielens" / "train.py"
pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, tmp_path: Path, nproc: int = 2) -> str:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1")
    env.pop("RECD_PLUGIN", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(TRAIN), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.mark.parametrize("sharding,light", [("table_wise", True), ("column_wise", True), ("row_wise", True),
                                            ("row_wise", False)])
def test_plugin_on_matches_plugin_off_step_by_step(sharding: str, light: bool, tmp_path: Path) -> None:
    losses = tmp_path / "losses"
    out = torchrun(["--data", "synthetic", "--compare", "--sharding", sharding, "--epochs", "1", "--max-steps", "4",
                    "--workers", "0", "--optimizer", "sgd", "--lr", "0.05", "--losses", str(losses)]
                   + (["--light"] if light else []), tmp_path)
    assert "recd-plugin sharding plan:" in out and f": {sharding}, fused" in out, out[-3000:]
    for rank in range(2):
        plain = json.loads(Path(f"{losses}.plain.rank{rank}").read_text())
        recd = json.loads(Path(f"{losses}.recd.rank{rank}").read_text())
        assert len(plain["losses"]) == len(recd["losses"]) == 4
        for step, (a, b) in enumerate(zip(plain["losses"], recd["losses"])):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (rank, step, a, b)
        assert abs(plain["auc"] - recd["auc"]) <= 1e-5


def test_dist_benchmark_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "dist.json"
    proc = subprocess.run([sys.executable, "-m", "recd_plugin.bench", "dist", "--quick", "--no-docs", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    for key in ("ratio", "single_process_ratio", "comm_ratio", "dup_factor", "world_size"):
        assert key in r, key
    assert r["world_size"] == 2 and r["max_loss_diff"] <= 1e-5
    assert r["plain_embedding_bytes_per_step"] > r["recd_embedding_bytes_per_step"] > 0  # counted, not estimated
    assert r["dup_factor"] > 1
