"""``recd-plugin``: command-line tools around the plugin.

::

    recd-plugin check-flag "groups.user.key=session_id; groups.user.features=user_id,history"
    recd-plugin check-flag @recd.toml            # parse a flag / TOML file and print the config
    recd-plugin fetch-movielens [--dest DIR]     # download MovieLens-100k into the cache
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
        elif args.command == "fetch-movielens":
            from recd_plugin.data import default_root, fetch_movielens_100k

            print(fetch_movielens_100k(args.dest or default_root()))
    except RecDError as e:
        print(f"recd-plugin: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
