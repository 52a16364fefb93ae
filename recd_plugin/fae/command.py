"""``recd-plugin profile``: profile a data source, print the coverage report, write the hot set.

::

    recd-plugin profile criteo-synthetic --budget 1% --out out/          # 1% of all rows' bytes
    recd-plugin profile movielens-100k --tables user_id,item_id --budget 16KiB --dim 32
    recd-plugin profile data/events.parquet --tables item_id:1682,user_id:943 --budget 64MiB
    recd-plugin profile criteo-synthetic --budget 1% --show-plan --hbm-cap 1GiB

DATA is a Parquet file / directory with one row per sample, or a built-in source
(``recd_plugin.data.builtin``, the names every command takes): ``synthetic``,
``movielens-100k`` (fetched into the cache if missing), ``criteo-synthetic`` (``--batches`` x
``--batch-size`` samples generated on demand, tables capped at ``--max-rows``) or
``criteo-sessions`` (``--batches`` x ``--batch-size`` samples in sessions, same cap).
``--tables`` lists features as ``name[:rows[:dim]]`` (default: every sparse feature whose
size the source knows; rows from the source's cardinalities, dim from ``--dim``); each feature
gets its own table of the same name.
``--budget`` is bytes (``65536``, ``64KiB``, ``1.5GB``) or a share of all tables' bytes
(``1%``). Writes ``OUT/hot.npz`` (``HotSet.load``) and ``OUT/coverage.png``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import pyarrow as pa

from recd_plugin.errors import HotSetError
from recd_plugin.fae.hotset import TableShape

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from recd_plugin.data.builtin import builtin_names

    p.add_argument("data", help=f"Parquet file/directory, or a built-in source: {', '.join(builtin_names())}")
    p.add_argument("--budget", required=True, help="fast-memory bytes (64MiB, 1e9) or a share of all rows (1%%)")
    p.add_argument("--tables", default=None, help="features as name[:rows[:dim]], comma separated (default: all)")
    p.add_argument("--dim", type=int, default=16, help="embedding dim of tables without one (default 16)")
    p.add_argument("--dtype-bytes", type=int, default=4, help="bytes per element (4: float32)")
    p.add_argument("--sample", type=float, default=0.05, help="fraction of the input profiled (default 0.05)")
    p.add_argument("--unit", choices=["sample", "batch"], default="sample", help="what is sampled")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", type=Path, default=Path("fae_profile"), help="output directory")
    p.add_argument("--batches", type=int, default=1000, help="criteo-*: batches in the data")
    p.add_argument("--batch-size", type=int, default=2048, help="batch size of the built-in sources")
    p.add_argument("--max-rows", type=int, default=1_000_000, help="criteo-*: table size cap")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--show-plan", action="store_true", help="print TorchRec's plan without / with the hints")
    p.add_argument("--world-size", type=int, default=2, help="--show-plan: GPUs in the topology")
    p.add_argument("--hbm-cap", default=None, help="--show-plan: HBM bytes per GPU (default: TorchRec's)")


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise HotSetError(f"cannot read the byte size {text!r}: write e.g. 65536, 64KiB, 512MB, 1.5GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _source(args: argparse.Namespace) -> Tuple[object, Dict[str, int]]:
    """(batches, a table or a Parquet path; {feature: rows known from the source})."""
    from recd_plugin.data.builtin import not_found_hint, resolve_data

    found = resolve_data(args.data, HotSetError)
    if isinstance(found, Path):
        from recd_plugin.storage.parquet_input import open_parquet

        meta = open_parquet(found, error=HotSetError, hint=not_found_hint()).metadata
        known = json.loads(meta[b"recd.cardinalities"]) if b"recd.cardinalities" in meta else {}
        return found, {k: int(v) for k, v in known.items()}
    lazy = found.batches(args.batches, args.batch_size, max_rows=args.max_rows)
    if lazy is not None:  # generated on demand: a 5% sample builds 5% of the batches
        return lazy
    data = found.load(num_samples=args.batches * args.batch_size, max_rows=args.max_rows)
    return data.table, data.cardinalities


def _tables(spec: Optional[str], known: Dict[str, int], dim: int, dtype_bytes: int) -> Dict[str, TableShape]:
    if not spec:
        if not known:
            raise HotSetError("the data does not record its table sizes: give --tables name:rows[,name:rows...]")
        return {f: TableShape(n, dim, dtype_bytes) for f, n in known.items()}
    tables = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        name = parts[0]
        if len(parts) > 1 and parts[1]:
            rows = int(parts[1])
        elif name in known:
            rows = known[name]
        else:
            raise HotSetError(f"no size for table {name!r}: the data does not record it; write {name}:ROWS")
        tables[name] = TableShape(rows, int(parts[2]) if len(parts) > 2 else dim, dtype_bytes)
    return tables


def run(args: argparse.Namespace) -> None:
    from recd_plugin.errors import OptionalDependencyError
    from recd_plugin.fae.coverage import build_report, plot_coverage
    from recd_plugin.fae.profile import profile_accesses

    source, known = _source(args)
    tables = _tables(args.tables, known, args.dim, args.dtype_bytes)
    if isinstance(source, pa.Table):  # a built-in source's rows: batched like a training loader
        from recd_plugin.data import TableBatches
        from recd_plugin.fae.access import PARQUET_FIX
        from recd_plugin.storage.parquet_input import check_schema

        check_schema(args.data, source.schema, list(tables), error=HotSetError, fix=PARQUET_FIX)
        source = TableBatches(source, args.batch_size, sparse_features=list(tables), dense_features=[])
    total = sum(s.num_embeddings * s.row_bytes for s in tables.values())
    budget = (int(float(args.budget.rstrip("% ")) / 100 * total) if args.budget.strip().endswith("%")
              else parse_bytes(args.budget))
    profile = profile_accesses(source, tables, sample_fraction=args.sample, seed=args.seed, unit=args.unit,
                               progress=not args.no_progress)
    hot = profile.hot_set(budget)
    print(build_report(profile, hot))
    args.out.mkdir(parents=True, exist_ok=True)
    hot.save(args.out / "hot.npz")
    try:
        plot_coverage(profile, args.out / "coverage.png")
        print(f"wrote {args.out / 'hot.npz'} and {args.out / 'coverage.png'}")
    except OptionalDependencyError as e:  # the hot set is the product; the plot is an extra
        print(f"wrote {args.out / 'hot.npz'}; coverage plot skipped: {e}")
    if args.show_plan:
        from torchrec.modules.embedding_configs import EmbeddingBagConfig

        from recd_plugin.fae.hints import show_plans

        configs = [EmbeddingBagConfig(name=t, feature_names=[t], num_embeddings=s.num_embeddings,
                                      embedding_dim=s.embedding_dim) for t, s in tables.items()]
        cap = parse_bytes(args.hbm_cap) if args.hbm_cap else None
        print(show_plans(configs, profile, hot, world_size=args.world_size, hbm_cap=cap))
