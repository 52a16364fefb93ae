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
import subprocess
import sys
from pathlib import Path

import pytest
from two_ranks import HANG_GUARD_S, free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "movielens" / "train.py"


def torchrun(args, tmp_path: Path, nproc: int = 2, restarts: int = 0, ok: bool = True) -> str:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1")
    env.pop("RECD_PLUGIN", None)
    # c10d rendezvous, as TorchX launches: each restart is a new rendezvous round (a static
    # master_port store can hand a restarted rank its dead peer's stale address).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--max-restarts", str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           str(TRAIN), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, out[-5000:]
    return out


def read_log(path: str):
    """(per-step [(step, loss)], final epoch result) of a --losses file."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [(d["step"], d["loss"]) for d in lines if "step" in d], [d for d in lines if "step" not in d][-1:]


COMMON = ["--data", "synthetic", "--workers", "0", "--optimizer", "sgd", "--lr", "0.05", "--epochs", "1"]


@pytest.mark.parametrize("sharding,light", [("table_wise", True), ("column_wise", True), ("row_wise", True),
                                            ("row_wise", False)])
def test_plugin_on_matches_plugin_off_step_by_step(sharding: str, light: bool, tmp_path: Path) -> None:
    losses = tmp_path / "losses"
    out = torchrun(COMMON + ["--compare", "--sharding", sharding, "--max-steps", "4", "--losses", str(losses)]
                   + (["--light"] if light else []), tmp_path)
    assert "recd-plugin sharding plan:" in out and f": {sharding}, fused" in out, out[-3000:]
    for rank in range(2):
        plain, [plain_result] = read_log(f"{losses}.plain.rank{rank}")
        recd, [recd_result] = read_log(f"{losses}.recd.rank{rank}")
        assert [s for s, _ in plain] == [s for s, _ in recd] == [1, 2, 3, 4]
        for (step, a), (_, b) in zip(plain, recd):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (rank, step, a, b)
        assert abs(plain_result["auc"] - recd_result["auc"]) <= 1e-5


def test_train_pipeline_sparse_dist_plugin_on_matches_off(tmp_path: Path) -> None:
    """TorchRec's TrainPipelineSparseDist pipelines the item tower's input all-to-all; the user
    tower's sharded modules (fed unique rows by the tower) are left unpipelined, on purpose."""
    losses = tmp_path / "losses"
    out = torchrun(COMMON + ["--compare", "--pipeline", "--sharding", "row_wise", "--light", "--max-steps", "4",
                             "--losses", str(losses)], tmp_path)
    assert "Module 'model.user_tower.embeddings' will NOT be pipelined" in out, out[-3000:]
    assert "Module 'model.item_tower.embeddings' will NOT be pipelined" not in out, out[-3000:]
    for rank in range(2):
        plain, _ = read_log(f"{losses}.plain.rank{rank}")
        recd, _ = read_log(f"{losses}.recd.rank{rank}")
        assert [s for s, _ in plain] == [s for s, _ in recd] == [1, 2, 3, 4]
        for (step, a), (_, b) in zip(plain, recd):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (rank, step, a, b)


def test_one_process_dmp_with_the_pipeline_needs_no_flag(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 1`` (TorchX ``-j 1x1``) + TrainPipelineSparseDist: sharded mode
    is chosen by itself (no ``sharded=true`` in the flag), and plugin on matches plugin off."""
    losses = tmp_path / "losses"
    torchrun(COMMON + ["--compare", "--pipeline", "--light", "--max-steps", "4", "--losses", str(losses)],
             tmp_path, nproc=1)
    plain, _ = read_log(f"{losses}.plain")
    recd, _ = read_log(f"{losses}.recd")
    assert [s for s, _ in plain] == [s for s, _ in recd] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(plain, recd):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, a, b)


RECD = ["--recd", str(ROOT / "examples" / "movielens" / "recd.toml"), "--sharding", "row_wise", "--light",
        "--max-steps", "6"]


def test_killed_rank_fails_the_job_with_its_error(tmp_path: Path) -> None:
    out = torchrun(COMMON + RECD + ["--fail-at-step", "3"], tmp_path, ok=False)
    assert "killing rank 1" in out and "rank      : 1" in out and "Signal 9 (SIGKILL)" in out, out[-4000:]


def test_restart_resumes_from_checkpoint_without_losing_or_repeating_samples(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    torchrun(COMMON + RECD + ["--losses", str(straight)], tmp_path)
    resumed = tmp_path / "resumed"
    out = torchrun(COMMON + RECD + ["--losses", str(resumed), "--checkpoint-dir", str(tmp_path / "ckpt"),
                                    "--checkpoint-every", "2", "--fail-at-step", "3"], tmp_path, restarts=1)
    assert "killing rank 1" in out and "resumed from step 2 (epoch 0, global batch 4, 2 ranks" in out, out[-4000:]
    for rank in range(2):
        want = dict(read_log(f"{straight}.recd.rank{rank}")[0])
        got = read_log(f"{resumed}.recd.rank{rank}")[0]
        restart = max(i for i, (s, _) in enumerate(got) if s == 3)  # the restarted attempt redoes step 3
        assert [s for s, _ in got[restart:]] == [3, 4, 5, 6]          # then every step once, in order
        for step, loss in got:                                          # each on the same batch as straight
            assert abs(loss - want[step]) <= 1e-6 * max(1.0, abs(loss)), (rank, step, loss, want[step])


def test_dist_benchmark_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "dist.json"
    proc = subprocess.run([sys.executable, "-m", "recd_plugin.bench", "dist", "--quick", "--no-docs", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    for key in ("ratio", "single_process_ratio", "comm_ratio", "dup_factor", "world_size"):
        assert key in r, key
    assert r["world_size"] == 2 and r["max_loss_diff"] <= 1e-5
    assert r["plain_embedding_bytes_per_step"] > r["recd_embedding_bytes_per_step"] > 0  # counted, not estimated
    assert r["dup_factor"] > 1
