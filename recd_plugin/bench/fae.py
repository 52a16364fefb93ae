"""FAE benchmark: tier traffic of FAE's static hot set vs LRU / LFU, and the hot/cold layout's cost.

``python -m recd_plugin.bench fae [--quick] [--json PATH] [--no-docs]`` on the synthetic
Criteo-like data (26 tables, Criteo Kaggle cardinalities capped at ``max_rows``, default skew):

(a) **tier traffic** -- the training set is ``train_batches`` batches (seed ``seed``); the
    profiler draws 5% of its batches (FAE's sample) and picks the hot set for a budget of 1%
    of all rows. The evaluation replays *held-out* batches (seed ``seed + 1``, never
    profiled): LRU and LFU caches of the same capacity in rows are first warmed on as many
    held-out steps as the profile read (equal information), then all three policies are
    measured on the next ``measured`` steps (``recd_plugin.fae.trace``: exact, row by row).
    The hot-sample fraction (samples whose every id is hot) is measured on the held-out steps.
(b) **CPU training** samples/s of a small DLRM-like model (EBC dim 16 + MLPs, SGD) with its
    EBC swapped for ``HotColdEmbeddingBagCollection`` vs the plain EBC, same initial weights
    and batches, sides alternated per step, median of the timed steps after warm-up; both
    sides' losses must agree at every step.
(c) **GPU**: FAE layout vs TorchRec ``FUSED_UVM_CACHING`` -- null without a GPU.

JSON keys: ``hot_sample_fraction``, ``slow_rows_ratio_vs_lru``, ``slow_rows_ratio_vs_lfu``,
``cpu_ratio``, ``gpu_ratio`` (null without a GPU), and the settings and per-step numbers.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recd_plugin.bench.report import machine, median, timed, publish
from recd_plugin.data.criteo import DENSE_FIELDS, CriteoBatches, criteo_cardinalities
from recd_plugin.fae.access import tables_from_configs
from recd_plugin.fae.profile import profile_accesses
from recd_plugin.fae.trace import AccessTrace, compare_tiers, hot_sample_fraction

TARGET_LRU, TARGET_LFU, TARGET_HOT = 0.7, 1.0, 0.30


def _configs(max_rows: int, dim: int) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{f}", feature_names=[f], num_embeddings=n, embedding_dim=dim)
            for f, n in criteo_cardinalities(max_rows).items()]


def tier_traffic(max_rows: int, train_batches: int, measured: int, batch_size: int, seed: int,
                 dim: int = 16, row_share: float = 0.01) -> Dict[str, Any]:
    """Part (a): profile 5% of the training batches, replay held-out steps."""
    tables, f2t = tables_from_configs(_configs(max_rows, dim))
    profile = profile_accesses(CriteoBatches(train_batches, batch_size, seed, max_rows), tables, f2t,
                               sample_fraction=0.05, seed=seed, unit="batch", progress=False)
    total_rows = sum(s.num_embeddings for s in tables.values())
    budget = int(round(row_share * total_rows)) * dim * 4
    hot = profile.hot_set(budget)
    warmup = profile.batches_sampled  # LRU/LFU warm on as many steps as FAE profiled
    held_out = CriteoBatches(warmup + measured, batch_size, seed + 1, max_rows)
    trace = AccessTrace.from_source(held_out, tables, f2t)
    traffic = compare_tiers(trace, hot, warmup_steps=warmup)
    measured_batches = (held_out[i] for i in range(warmup, warmup + measured))
    return {
        "max_rows": max_rows, "total_rows": total_rows, "dim": dim, "budget_bytes": budget,
        "budget_row_share": row_share, "capacity_rows": traffic.capacity_rows,
        "train_batches": train_batches, "profiled_batches": profile.batches_sampled,
        "profiled_samples": profile.samples_sampled, "warmup_steps": warmup, "measured_steps": measured,
        "unique_rows_per_step": float(traffic.accessed.mean()),
        "slow_rows_per_step": {p: traffic.per_step(p) for p in ("static", "lru", "lfu")},
        "slow_rows_ratio_vs_lru": traffic.ratio("lru"), "slow_rows_ratio_vs_lfu": traffic.ratio("lfu"),
        "hot_sample_fraction": hot_sample_fraction(measured_batches, hot, tables, f2t),
        "hot_sample_fraction_in_sample": hot.info["hot_sample_fraction"],
        "traffic_text": str(traffic),
    }


class _DLRMLite(nn.Module):
    """dense [B, 13] -> MLP -> 16; concat with 26 pooled embeddings -> MLP -> logit [B]."""

    def __init__(self, configs: List[EmbeddingBagConfig]) -> None:
        super().__init__()
        dim = configs[0].embedding_dim
        self.ebc = EmbeddingBagCollection(tables=configs)
        self.bottom = nn.Sequential(nn.Linear(len(DENSE_FIELDS), dim), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(dim * (len(configs) + 1), 64), nn.ReLU(), nn.Linear(64, 1))
        self.keys = [f for c in configs for f in c.feature_names]

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        pooled = self.ebc(sparse)
        x = torch.cat([self.bottom(dense)] + [pooled[k] for k in self.keys], dim=1)
        return self.top(x).squeeze(1)


def cpu_training(max_rows: int, steps: int, batch_size: int, seed: int, dim: int = 16,
                 row_share: float = 0.01, warmup: int = 3) -> Dict[str, Any]:
    """Part (b): samples/s of the hot/cold layout vs the plain EBC on CPU."""
    from recd_plugin.fae.hotcold import convert_hot_cold

    configs = _configs(max_rows, dim)
    tables, f2t = tables_from_configs(configs)
    profile = profile_accesses(CriteoBatches(20 * (warmup + steps), batch_size, seed, max_rows), tables, f2t,
                               seed=seed, unit="batch", progress=False)
    hot = profile.hot_set(int(round(row_share * sum(s.num_embeddings for s in tables.values()))) * dim * 4)
    torch.manual_seed(seed)
    plain = _DLRMLite(configs)
    fae = copy.deepcopy(plain)
    convert_hot_cold(fae, hot)
    batches = CriteoBatches(warmup + steps, batch_size, seed + 1, max_rows)  # held out
    sides = {"plain": plain, "fae": fae}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.05) for k, m in sides.items()}
    loss_fn = nn.BCEWithLogitsLoss()
    times: Dict[str, List[float]] = {"plain": [], "fae": []}
    max_diff = 0.0
    for i in range(warmup + steps):
        batch = batches[i]
        losses = {}
        for name in (("plain", "fae") if i % 2 == 0 else ("fae", "plain")):  # alternate: speed drifts

            def step(name: str = name) -> None:
                opts[name].zero_grad()
                loss = loss_fn(sides[name](batch.dense_features, batch.sparse_features), batch.labels)
                loss.backward()
                opts[name].step()
                losses[name] = loss.item()

            t = timed(step)
            if i >= warmup:
                times[name].append(t)
        max_diff = max(max_diff, abs(losses["plain"] - losses["fae"]))
    if max_diff > 1e-4:
        raise AssertionError(f"hot/cold and plain EBC losses differ by {max_diff:.2e}: not the same computation")
    t_plain, t_fae = median(times["plain"]), median(times["fae"])
    return {"cpu_ratio": t_plain / t_fae, "plain_samples_per_s": batch_size / t_plain,
            "fae_samples_per_s": batch_size / t_fae, "max_rows": max_rows, "steps": steps,
            "hot_rows": sum(hot.num_hot(t) for t in tables), "max_loss_diff": max_diff}


def run(quick: bool = False, json_path: Optional[str] = None, batch_size: int = 2048, seed: int = 0,
        write_docs: bool = True, verbose: bool = False) -> Dict[str, Any]:
    a = tier_traffic(max_rows=1_000_000, train_batches=2_000 if quick else 10_000,
                     measured=30 if quick else 100, batch_size=batch_size, seed=seed)
    if verbose:
        print(a["traffic_text"])
    b = cpu_training(max_rows=100_000, steps=8 if quick else 30, batch_size=batch_size, seed=seed)
    gpu_note = ("no GPU (torch.cuda.is_available() is False): skipped" if not torch.cuda.is_available()
                else "GPU present, but the FAE vs FUSED_UVM_CACHING comparison is not implemented yet")
    result = {
        "hot_sample_fraction": a["hot_sample_fraction"],
        "slow_rows_ratio_vs_lru": a["slow_rows_ratio_vs_lru"],
        "slow_rows_ratio_vs_lfu": a["slow_rows_ratio_vs_lfu"],
        "cpu_ratio": b["cpu_ratio"], "gpu_ratio": None, "gpu_note": gpu_note,
        "tier_traffic": {k: v for k, v in a.items() if k != "traffic_text"}, "cpu_training": b,
        "batch_size": batch_size, "quick": quick, "machine": machine(),
    }
    md = _markdown(a, b, gpu_note, batch_size, quick)
    publish("fae", md, result, json_path, write_docs)
    return result


def _verdict(value: Optional[float], target: float, le: bool) -> str:
    if value is None or np.isnan(value):
        return "not measured"
    ok = value <= target if le else value >= target
    return f"target {'<=' if le else '>='} {target:g}: {'met' if ok else 'MISSED'}"


def _markdown(a: Dict[str, Any], b: Dict[str, Any], gpu_note: str, batch_size: int, quick: bool) -> str:
    s = a["slow_rows_per_step"]
    cpu = ("| CPU training samples/s, hot/cold vs plain EBC | "
           f"{b['fae_samples_per_s']:,.0f} vs {b['plain_samples_per_s']:,.0f} | {b['cpu_ratio']:.2f}x | "
           "must not be slower by > 10%: " + ("met" if b["cpu_ratio"] >= 0.9 else "MISSED") + " |"
           if b.get("cpu_ratio") is not None else f"| CPU training | null | - | {b.get('note')} |")
    return (
        "## FAE: tier traffic and hot/cold layout (synthetic Criteo-like)\n\n"
        f"Command: `python -m recd_plugin.bench fae{' --quick' if quick else ''}`. 26 tables, Criteo Kaggle "
        f"cardinalities capped at {a['max_rows']:,} rows ({a['total_rows']:,} rows), dim {a['dim']}, default skew, "
        f"batch {batch_size}. Hot set from a profile of 5% of the {a['train_batches']:,} training batches "
        f"({a['profiled_batches']} batches, {a['profiled_samples']:,} samples); budget 1% of rows = "
        f"{a['capacity_rows']:,} rows ({a['budget_bytes']:,} B). Evaluated on held-out batches: LRU and LFU "
        f"(same capacity in rows) warmed on {a['warmup_steps']} held-out steps, then all measured on "
        f"{a['measured_steps']} steps ({a['unique_rows_per_step']:,.0f} unique rows per step; exact replay, "
        "row by row).\n\n"
        "| | value | ratio | target |\n|---|---|---|---|\n"
        f"| slow-tier rows/step: FAE static vs LRU | {s['static']:,.0f} vs {s['lru']:,.0f} | "
        f"{a['slow_rows_ratio_vs_lru']:.3f} | {_verdict(a['slow_rows_ratio_vs_lru'], TARGET_LRU, True)} |\n"
        f"| slow-tier rows/step: FAE static vs LFU | {s['static']:,.0f} vs {s['lfu']:,.0f} | "
        f"{a['slow_rows_ratio_vs_lfu']:.3f} | {_verdict(a['slow_rows_ratio_vs_lfu'], TARGET_LFU, True)} |\n"
        f"| hot-sample fraction at 1% of rows (held out) | {100 * a['hot_sample_fraction']:.1f}% "
        f"(in-sample {100 * a['hot_sample_fraction_in_sample']:.1f}%) | - | "
        f"{_verdict(a['hot_sample_fraction'], TARGET_HOT, False)} |\n"
        f"{cpu}\n"
        f"| GPU samples/s, FAE vs FUSED_UVM_CACHING | null | - | {gpu_note} |\n\n"
        f"CPU training: DLRM-like model (EBC dim 16 + MLPs, SGD), tables capped at {b.get('max_rows', 0):,} rows, "
        f"hot set 1% of rows, median of {b.get('steps', 0)} steps after warm-up, sides alternated; losses "
        f"agree within {b.get('max_loss_diff', float('nan')):.1e}. Machine: {machine()}.\n"
    )
