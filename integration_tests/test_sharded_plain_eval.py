"""Under DMP at 2 ranks, evaluating the plugin's model on plain batches (the evaluation loader
not wrapped) gives the same outputs as on the plugin's aligned IKJTs, and both equal the plain
model's: wrapping the evaluation loader only deduplicates work, it never changes results.

Uses ``recd_plugin/bench/models.py``'s sides (TorchRec's DLRM and the MovieLens model, DMP's
default planner and sharders); ``probe_batches=0`` keeps the dedup route.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from two_ranks import PG_TIMEOUT, WORLD, main, reporting, run


def worker(rank: int, port: int, case: dict, outdir: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    with reporting(rank, outdir) as res:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
        import recd_plugin
        from recd_plugin.bench import models

        sides, _ = models._sides(case["model"], case["batch"], 2, False, True, rank, WORLD, "; probe_batches=0")
        plain, plugin = sides["plain"], sides["plugin"]
        diffs = []
        with torch.no_grad():
            for side in (plain, plugin):
                side.model.eval()
            for b_plain, b_plugin in zip(plain.batches, plugin.batches):
                _, (_, ref, _) = plain.model(b_plain)
                _, (_, on_plain, _) = plugin.model(b_plain)      # evaluation loader not wrapped
                _, (_, on_ikjt, _) = plugin.model(b_plugin)      # wrapped: aligned IKJTs
                diffs.append([float((on_plain - ref).abs().max()), float((on_ikjt - ref).abs().max())])
        res["diffs"] = diffs
        res["ikjt"] = all(recd_plugin.is_dedup(b.sparse_features) for b in plugin.batches)


@pytest.mark.parametrize("model", ["dlrm", "movielens_light"])
def test_plain_evaluation_batches_give_the_wrapped_results(model: str, tmp_path: Path) -> None:
    results = run(__file__, {"model": model, "batch": 32}, tmp_path)
    for r in results:
        assert r["diffs"] and r["ikjt"], r  # the wrapped side really got aligned IKJTs
        for on_plain, on_ikjt in r["diffs"]:
            assert on_plain <= 1e-5 and on_ikjt <= 1e-5, r["diffs"]


if __name__ == "__main__":
    main(worker)
