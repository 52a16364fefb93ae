"""Benchmarks: ``python -m recd_plugin.bench NAME [--quick] [--json PATH]``.

Each benchmark measures ratios side by side in one process, checks both sides computed the
same thing, prints a table and, on a full run with the default settings in a source checkout,
regenerates its section of docs/benchmarks.md and recd_plugin/bench/results/NAME.json (``--quick``,
``--batch-size``, ``--seed``, ``--models`` or ``--modes`` leave the published figures alone)::

    python -m recd_plugin.bench dedup               # RecD dedup on MovieLens-100k (~2 min)
    python -m recd_plugin.bench dedup --quick       # fewer steps (< 60 s on 2 cores); docs untouched
    python -m recd_plugin.bench dedup --json out.json --no-docs
    python -m recd_plugin.bench fae --quick         # FAE tier traffic + hot/cold layout
    python -m recd_plugin.bench des --quick         # DES vs TorchRec sharding, 2 gloo ranks
    python -m recd_plugin.bench models --quick      # TorchRec's DLRM, DLRM_DCN, two-tower, MovieLens
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from recd_plugin.bench.report import ensure_allocator_env


def main(argv: Optional[List[str]] = None, reexec: bool = False) -> None:
    """Run a benchmark; ``reexec`` (command line only) restarts the process with MALLOC_ENV."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m recd_plugin.bench", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=["dedup", "storage", "des", "dist", "fae", "models"], help="which benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a fast check")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--batch-size", type=int, default=None, help="default 1024 (fae: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--verbose", action="store_true", help="print every timed step")
    parser.add_argument("--models", nargs="+", default=None, help="models: only these models")
    parser.add_argument("--modes", nargs="+", default=None, help="models: only these modes (unsharded dmp1 dmp2 dmp2_hints)")
    args = parser.parse_args(argv)
    if reexec:
        ensure_allocator_env(argv)
    batch_size = args.batch_size or (2048 if args.name == "fae" else 1024)
    write_docs = not args.no_docs and publishable(args)
    if args.name == "dedup":
        from recd_plugin.bench import dedup

        dedup.run(quick=args.quick, json_path=args.json, batch_size=batch_size, seed=args.seed,
                  write_docs=write_docs, verbose=args.verbose)
    elif args.name == "dist":
        from recd_plugin.bench import dist

        dist.run(quick=args.quick, json_path=args.json, batch_size=batch_size,
                 write_docs=write_docs, verbose=args.verbose)
    elif args.name == "storage":
        from recd_plugin.bench import storage

        storage.run(quick=args.quick, json_path=args.json, batch_size=batch_size,
                    write_docs=write_docs, verbose=args.verbose)
    elif args.name == "des":
        from recd_plugin.bench import des

        des.run(quick=args.quick, json_path=args.json, batch_size=batch_size, seed=args.seed,
                write_docs=write_docs, verbose=args.verbose)
    elif args.name == "models":
        from recd_plugin.bench import models

        models.run(quick=args.quick, json_path=args.json, batch_sizes=[args.batch_size] if args.batch_size else None,
                   write_docs=write_docs, verbose=args.verbose, models=args.models, modes=args.modes)
    elif args.name == "fae":
        from recd_plugin.bench import fae

        fae.run(quick=args.quick, json_path=args.json, batch_size=batch_size, seed=args.seed,
                write_docs=write_docs, verbose=args.verbose)


def publishable(args: argparse.Namespace) -> bool:
    """Whether this run may rewrite the published figures (docs/benchmarks.md, recd_plugin/bench/results/):
    only a full run with the default settings. A quick or partial run prints and writes --json
    only, so a fast check never replaces the full run's numbers."""
    changed = [name for name, on in (("--quick", args.quick), ("--batch-size", args.batch_size is not None),
                                     ("--seed", args.seed != 0), ("--models", bool(args.models)),
                                     ("--modes", bool(args.modes))) if on]
    if changed and not args.no_docs:
        print(f"docs/benchmarks.md not rewritten: published figures come from full runs with default settings "
              f"(this run sets {', '.join(changed)}); add --json FILE to keep its numbers")
    return not changed


if __name__ == "__main__":
    main(reexec=True)
