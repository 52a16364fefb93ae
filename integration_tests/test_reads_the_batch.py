"""Model code that reads grouped features of the batch itself sees the plain batch, in every
mode: DistributedModelParallel at 1 and 2 gloo ranks, trained by a plain loop and by TorchRec's
TrainPipelineSparseDist, tables built on ``meta`` (DMP materializes them) or materialized.

The model (``recd_plugin.bench.reads_batch.ReadsBatch``) builds an attention mask from
``kjt["history"].to_padded_dense``, reads ``kjt.lengths()`` and a per-sample position feature,
outside its embedding modules. Plugin off and on train the same batches from the same seed;
per-step losses must be equal: through the route decision's measurement blocks (route=measure:
plain and deduplicated batches alternate in the pipeline), with every group kept
(route=dedup), and with the history attention declared a tower. Equal losses on the meta model
also show that ``apply`` moved no random state: DMP draws its tables' initial weights after it.
The unsharded mode is tests/test_reads_batch.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from two_ranks import PG_TIMEOUT, main, reporting, run

STEPS = 44  # the decision's schedule (warm-up and up to three rounds) fits in it


def worker(rank: int, port: int, case: dict, outdir: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    with reporting(rank, outdir) as res:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        world = case["world"]
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=PG_TIMEOUT)
        import recd_plugin
        from recd_plugin.bench.models import _Side
        from recd_plugin.bench.reads_batch import FLAG, ReadsBatch, with_position
        batches = [with_position(_session_batch(seed)) for seed in range(STEPS * world)][rank::world]
        card = {"user_id": 64, "history": 64, "item_id": 64, "position": 64}
        device = torch.device("meta") if case["meta"] else None
        losses = {}
        for side in ("off", "on"):
            torch.manual_seed(0)
            model = ReadsBatch(card, tower=case["tower"], embedding_device=device)
            loader = batches
            if side == "on":
                flag = FLAG + case["flag"] + ("; towers.seq=user" if case["tower"] else "")
                model, loader = recd_plugin.apply(recd_plugin.RecDConfig.from_string(flag), model, batches)
            s = _Side(model, loader, dmp=True, pipeline=case["pipeline"])
            losses[side] = []
            s.run_pass(None, losses[side])
            if side == "on":
                decided = recd_plugin.decisions(model)
                res["decided"] = None if decided is None else [(d.group, d.kept) for d in decided]
        res["steps"] = len(losses["on"])
        res["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["off"], losses["on"]))
        dist.barrier()


def _session_batch(seed: int, batch: int = 32, session: int = 4):
    """A Batch of ``batch // session`` sessions of ``session`` samples: session_id, user_id and a
    history (0-5 items) constant within a session, item_id per sample."""
    import torch
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    n = batch // session
    of = torch.arange(batch) // session
    user = torch.randint(0, 64, (n,), generator=g)
    hist = [torch.randint(0, 64, (int(k),), generator=g) for k in torch.randint(0, 6, (n,), generator=g)]
    rows = {"session_id": [[seed * n + int(s)] for s in of], "user_id": [[int(user[s])] for s in of],
            "history": [hist[int(s)].tolist() for s in of],
            "item_id": [[int(i)] for i in torch.randint(0, 64, (batch,), generator=g)]}
    keys = list(rows)
    kjt = KeyedJaggedTensor(keys=keys, values=torch.tensor([v for k in keys for r in rows[k] for v in r]),
                            lengths=torch.tensor([len(r) for k in keys for r in rows[k]]), stride=batch)
    return Batch(dense_features=torch.zeros(batch, 1), sparse_features=kjt,
                 labels=torch.randint(0, 2, (batch,), generator=g).float())


CASES = [
    dict(world=2, pipeline=True, meta=True, tower=False, flag=""),
    dict(world=2, pipeline=False, meta=False, tower=False, flag=""),
    dict(world=1, pipeline=True, meta=False, tower=False, flag="; route=dedup"),
    dict(world=1, pipeline=False, meta=True, tower=True, flag=""),
    dict(world=2, pipeline=True, meta=False, tower=True, flag="; route=dedup"),
    dict(world=2, pipeline=False, meta=True, tower=False, flag="; route=dedup"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    [f"dmp{c['world']}", "pipeline" if c["pipeline"] else "loop", "meta" if c["meta"] else "materialized",
     "tower" if c["tower"] else "no_tower", "dedup" if "dedup" in c["flag"] else "measure"]))
def test_a_model_reading_the_batch_trains_exactly_as_plugin_off(case: dict, tmp_path: Path) -> None:
    for r in run(__file__, case, tmp_path):
        assert r["steps"] >= STEPS - 2, r  # every batch reached training
        assert r["max_loss_diff"] <= 1e-5, r
        assert r["decided"] is not None and r["decided"][0][0] == "user", r  # decided within the job
        if "dedup" in case["flag"]:
            assert r["decided"] == [["user", True]], r


if __name__ == "__main__":
    main(worker)
