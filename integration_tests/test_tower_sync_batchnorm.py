"""SyncBatchNorm inside a dedup tower at 2 ranks (CPU/gloo): exact global batch statistics.

Each rank holds its own batch (different batch sizes, different numbers of unique sessions)
and runs a tower holding ``SyncBatchNorm`` on its unique rows. Plugin off, SyncBatchNorm is a
batch norm over all ranks' samples together, so the reference is one ``BatchNorm1d`` run on
the concatenated global batch in each process. Over three SGD steps the tower's output on
each rank, the gradient reaching each session's input, the parameter gradients summed over ranks (what DDP's
all-reduce would average), the running statistics and ``num_batches_tracked`` must equal the
reference's. Two set-ups: sharded mode (aligned IKJTs, rows padded to the maximum U over ranks,
padded rows of count 0, every batch reduced) and unsharded (compact IKJTs; in one step a
rank has no repeats, so its tower runs on B plain rows while the other runs on U).

Torch's own SyncBatchNorm refuses CPU tensors; the plugin's weighted one runs on any device,
which is what lets this test run on gloo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

from two_ranks import PG_TIMEOUT, WORLD, main, reporting, run
import torch

LR = 0.1
#: Per step, per rank: (batch size, number of sessions). Unequal B and U across ranks; step 2
#: gives rank 1 no repeats at all (U == B).
STEPS: List[List[Tuple[int, int]]] = [[(12, 2), (9, 6)], [(5, 4), (16, 3)], [(10, 3), (7, 7)]]


def _data(step: int, rank: int) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
    """(session of each sample, x [B, 4] session-constant, target [B, 2]) of one rank's batch;
    every rank can compute every rank's data (the reference needs the global batch)."""
    batch, sessions = STEPS[step][rank]
    g = torch.Generator().manual_seed(100 * step + rank)
    session_of = torch.cat([torch.arange(sessions), torch.randint(0, sessions, (batch - sessions,), generator=g)])
    session_of = session_of[torch.randperm(batch, generator=g)]
    per_session = torch.randn(sessions, 4, generator=g, dtype=torch.float64)
    return session_of.tolist(), per_session[session_of], torch.randn(batch, 2, generator=g, dtype=torch.float64)


def _check(sharded: bool, momentum) -> int:
    import torch.distributed as dist
    from torch import nn
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recd_plugin import DedupContext, DedupSpec, FeatureGroup, build_ikjt, dedup_tower

    spec = DedupSpec([FeatureGroup("user", ("user_id",), key="session_id")])
    rank = dist.get_rank()

    class Holder(nn.Module):
        def __init__(self, tower: nn.Module) -> None:
            super().__init__()
            self.tower = tower

        def forward(self, kjt: KeyedJaggedTensor, x: torch.Tensor) -> torch.Tensor:
            return self.tower(x)

    torch.manual_seed(0)  # same weights on every rank
    tower = nn.Sequential(nn.Linear(4, 5), nn.SyncBatchNorm(5, momentum=momentum), nn.Tanh(), nn.Linear(5, 2))
    ref = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=momentum), nn.Tanh(), nn.Linear(5, 2))
    ref.load_state_dict(tower.state_dict(), strict=True)
    model, ref = Holder(tower).double(), ref.double()
    ctx = DedupContext.attach(model, spec, pad_over_ranks=sharded)
    dedup_tower(model.tower, ctx, group="user", name="tower", always=sharded)
    rows_seen: List[int] = []
    model.tower[1].register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape[0]))

    for step in range(len(STEPS)):
        data = [_data(step, r) for r in range(WORLD)]
        session_of, x, target = data[rank]
        users = [(7 * s + 3) % 50 for s in session_of]
        kjt = KeyedJaggedTensor(keys=["session_id", "user_id"], values=torch.tensor(session_of + users),
                                lengths=torch.ones(2 * len(session_of), dtype=torch.long), stride=len(session_of))
        x = x.clone().requires_grad_()
        out = model(build_ikjt(kjt, spec, aligned=sharded), x)
        ((out - target) ** 2).sum().backward()
        # The set-up is what it says: padded to the largest U over ranks, or U (B without repeats).
        unique = [STEPS[step][r][1] for r in range(WORLD)]
        own = STEPS[step][rank][1]
        assert rows_seen[-1] == (max(unique) if sharded else own), rows_seen
        grads = [p.grad.clone() for p in model.parameters()]
        for g in grads:
            dist.all_reduce(g)

        x_all = torch.cat([d[1] for d in data]).requires_grad_()
        want = ref(x_all)
        ((want - torch.cat([d[2] for d in data])) ** 2).sum().backward()
        start = sum(len(d[0]) for d in data[:rank])
        tol = dict(rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(out, want[start:start + len(session_of)], **tol)
        # The tower reads x once per session (on the sample carrying its row), so what must
        # match is the gradient each session's input receives: the sum over its samples.
        sessions = torch.tensor(session_of)

        def per_session(grad: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(set(session_of)), grad.shape[1], dtype=grad.dtype).index_add_(0, sessions, grad)

        torch.testing.assert_close(per_session(x.grad), per_session(x_all.grad[start:start + len(session_of)]), **tol)
        for (name, p), g in zip(ref.named_parameters(), grads):
            torch.testing.assert_close(g, p.grad, **tol, msg=f"step {step}: gradient of {name}")
        for name, b in ref.named_buffers():
            torch.testing.assert_close(model.tower.get_buffer(name), b, **tol, msg=f"step {step}: {name}")
        with torch.no_grad():
            for p, g, r in zip(model.parameters(), grads, ref.parameters()):
                p.sub_(LR * g)
                r.sub_(LR * r.grad)
                p.grad, r.grad = None, None
    assert int(model.tower[1].num_batches_tracked) == len(STEPS)
    return len(STEPS)


def worker(rank: int, port: int, case: dict, outdir: str) -> None:
    import torch.distributed as dist

    with reporting(rank, outdir) as res:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
        res["steps"] = [_check(sharded, momentum) for sharded, momentum in case["setups"]]


def test_sync_batch_norm_tower_at_two_ranks_equals_batch_norm_over_the_global_batch(tmp_path: Path) -> None:
    setups = [(True, 0.1), (False, None)]  # (sharded mode, momentum)
    for res in run(__file__, {"setups": setups}, tmp_path):
        assert res["steps"] == [len(STEPS)] * len(setups)


if __name__ == "__main__":
    main(worker)
