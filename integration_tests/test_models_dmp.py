"""TorchRec's own models under DistributedModelParallel + TrainPipelineSparseDist, plugin on
vs off, at world size 1 and 2 (gloo): per-step losses equal (SGD, same initial weights, same
batches), with the plugin switched on only by ``recd_plugin.apply`` before DMP and DMP's
default planner choosing the plan (table-wise, data-parallel and dense kernels alike).

Runs recd_plugin/bench/models.py's machinery on small cases; ``probe_batches=0`` forces the
dedup route so the aligned IKJTs and the output gather are what is tested.
"""

from __future__ import annotations

import pytest

from recd_plugin.bench import models

GRID = [("dlrm", 32, False), ("dlrm_dcn", 32, False), ("two_tower", 32, False), ("movielens_light", 64, False),
        ("dlrm", 32, True)]


@pytest.mark.parametrize("world", [1, 2])
def test_torchrec_models_train_identically_with_the_plugin_under_dmp_and_the_pipeline(world: int) -> None:
    results = models.run_dmp(world, GRID, steps=4, rounds=1, flag_suffix="; probe_batches=0")
    assert [(r["model"], r["batch"]) for r in results] == [(m, b) for m, b, _ in GRID]
    for r in results:
        assert r["route"] == "dedup", r
        assert r["compared_steps"] >= 3, r          # the pipeline ran every batch
        assert r["max_loss_diff"] <= 1e-5, r
    session = [r for r in results if r["unique_fraction"] < 1]
    assert session and all(r["dup_factor"] > 1.5 for r in session)  # duplicates really were removed
