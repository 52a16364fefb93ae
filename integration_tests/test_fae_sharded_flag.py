"""FAE from the flag under DistributedModelParallel, 2 ranks on CPU (gloo).

``torchrun --nproc_per_node 2 examples/movielens/train.py --recd "fae.hot_set=...; groups..."``
used to stop at ``apply`` ("fae: the hot/cold layout works on unsharded models"). Now the model
stays TorchRec's, the example's one ``recd_plugin.sharding.for_dmp`` call plans it, and the job
trains; on a cpu topology the hot set gives no placement hint and the printed plan says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from test_sharded_training import COMMON, ROOT, read_log, torchrun
from torchrec import EmbeddingBagCollection

from recd_plugin.data import cardinalities, generate_sessions
from recd_plugin.fae.hotset import HotSet, TableShape

RECD_FLAG = ("groups.user.key=session_id; groups.user.features=user_id,user_age,user_gender,user_occupation,"
             "user_zip,history; towers.user_tower=user")


def _example_tables() -> dict:
    """{table: TableShape} of the example's light TwoTower model on the synthetic data."""
    spec = importlib.util.spec_from_file_location("_movielens_model", ROOT / "examples" / "movielens" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.TwoTower(cardinalities(generate_sessions(seed=0)), light=True)
    return {c.name: TableShape(c.num_embeddings, c.embedding_dim) for m in model.modules()
            if isinstance(m, EmbeddingBagCollection) for c in m.embedding_bag_configs()}


def test_fae_flag_trains_sharded_with_the_hot_set_as_planner_input(tmp_path: Path) -> None:
    tables = _example_tables()
    rows = {t: np.arange(0, s.num_embeddings, 3) for t, s in tables.items()}  # a third of every table hot
    HotSet(tables, rows, budget_bytes=sum(len(r) * tables[t].row_bytes for t, r in rows.items())).save(
        tmp_path / "hot.npz")
    losses = tmp_path / "losses"
    flag = f"fae.hot_set={tmp_path / 'hot.npz'}; {RECD_FLAG}"
    out = torchrun(COMMON + ["--recd", flag, "--sharding", "row_wise", "--light", "--max-steps", "3",
                             "--losses", str(losses)], tmp_path)
    assert "hot/cold layout works on unsharded" not in out
    assert "recd-plugin sharding plan:" in out and ": row_wise, fused" in out, out[-3000:]
    assert "fae: no placement hints on cpu" in out, out[-3000:]
    for rank in range(2):
        steps, [result] = read_log(f"{losses}.recd.rank{rank}")
        assert len(steps) == 3 and all(np.isfinite(loss) for _, loss in steps)
        assert np.isfinite(result["loss"])
