"""``recd-plugin``: command-line tools around the plugin.

::

    recd-plugin check-flag "groups.user.key=session_id; groups.user.features=user_id,history"
    recd-plugin check-flag @recd.toml            # parse a flag / TOML file and print the config
    recd-plugin fetch-movielens [--dest DIR]     # download MovieLens-100k into the cache
    recd-plugin preprocess EVENTS OUT [--strict] # flat events Parquet -> deduplicated layout
    recd-plugin preprocess movielens-100k OUT    # the built-in sources work too (synthetic)
    recd-plugin profile criteo-synthetic --budget 1% --out out/   # FAE hot set + coverage
    recd-plugin analyze movielens-100k --out out/  # which of RecD / FAE / DES pays off, HTML report
    recd-plugin bench dedup --quick              # same as python -m recd_plugin.bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="recd-plugin", description="recd-plugin tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-flag", help="parse a plugin flag (or @file.toml) and print the config")
    check.add_argument("flag", nargs="?", default=None, help="default: $RECD_PLUGIN")
    fetch = sub.add_parser("fetch-movielens", help="download MovieLens-100k (GroupLens, else the RecBole wheel)")
    fetch.add_argument("--dest", type=Path, default=None)
    prep = sub.add_parser("preprocess", help="write the session-clustered, deduplicated layout of flat events")
    prep.add_argument("source", help="Parquet file or directory (one row per sample), or movielens-100k / synthetic")
    prep.add_argument("out", type=Path, help="output directory (written atomically, with a manifest)")
    prep.add_argument("--rows-per-file", type=int, default=1 << 20)
    prep.add_argument("--strict", action="store_true", help="refuse session/item columns that are not constant")
    prep.add_argument("--overwrite", action="store_true")
    prof = sub.add_parser("profile", help="FAE: profile embedding accesses, write the hot set for a budget")
    from recd_plugin.fae.command import add_arguments as add_profile_arguments

    add_profile_arguments(prof)
    ana = sub.add_parser("analyze", help="advise RecD / FAE / DES for your data: report with plots and a flag")
    from recd_plugin.analyze.command import add_arguments as add_analyze_arguments

    add_analyze_arguments(ana)
    sub.add_parser("bench", help="run a benchmark (python -m recd_plugin.bench --help)", add_help=False)
    if argv[:1] == ["bench"]:
        from recd_plugin.bench.__main__ import main as bench_main

        bench_main(argv[1:], reexec=True)
        return 0
    args = parser.parse_args(argv)

    from recd_plugin.errors import RecDError

    try:
        if args.command == "check-flag":
            from recd_plugin.config import RecDConfig

            config = RecDConfig.load(args.flag)
            print(f"plugin {'on' if config.enabled else 'off'}")
            for g in config.groups:
                print(f"  group {g.name}: key={g.key or '(row content)'} features={list(g.features)}")
            for module, group in config.towers.items():
                print(f"  tower {module} -> group {group}")
        elif args.command == "preprocess":
            from recd_plugin.storage import StorageSpec, preprocess

            source = args.source
            if source in ("movielens-100k", "synthetic"):
                from recd_plugin.data import generate_sessions, load_movielens_100k

                source = load_movielens_100k() if source == "movielens-100k" else generate_sessions()
            print(preprocess(source, args.out, StorageSpec.movielens(), rows_per_file=args.rows_per_file,
                             strict=args.strict, overwrite=args.overwrite))
        elif args.command == "profile":
            from recd_plugin.fae.command import run as run_profile

            run_profile(args)
        elif args.command == "analyze":
            from recd_plugin.analyze.command import run as run_analyze

            run_analyze(args)
        elif args.command == "fetch-movielens":
            from recd_plugin.data import default_root, fetch_movielens_100k

            print(fetch_movielens_100k(args.dest or default_root()))
    except RecDError as e:
        print(f"recd-plugin: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
