"""``recd-plugin``: command-line tools around the plugin.

::

    recd-plugin check-flag "groups.user.key=session_id; groups.user.features=user_id,history"
    recd-plugin check-flag @recd.toml            # parse a flag / TOML file and print the config
    recd-plugin fetch-movielens [--dest DIR]     # download MovieLens-100k into the cache
    recd-plugin preprocess EVENTS OUT --recd FLAG --item-key item_id --sparse user_id,history,item_id
                                                 # flat events Parquet -> deduplicated layout
    recd-plugin preprocess movielens-100k OUT    # a built-in source: its own column roles (synthetic too)
    recd-plugin profile criteo-synthetic --budget 1% --out out/   # FAE hot set + coverage
    recd-plugin analyze movielens-100k --out out/  # which of RecD / FAE / DES pays off, HTML report
    recd-plugin bench dedup --quick              # same as python -m recd_plugin.bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from recd_plugin.storage import StorageSpec


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="recd-plugin", description="recd-plugin tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-flag", help="parse a plugin flag (or @file.toml) and print the config")
    check.add_argument("flag", nargs="?", default=None, help="default: $RECD_PLUGIN")
    fetch = sub.add_parser("fetch-movielens", help="download MovieLens-100k (GroupLens, else the RecBole wheel)")
    fetch.add_argument("--dest", type=Path, default=None)
    prep = sub.add_parser("preprocess", help="write the session-clustered, deduplicated layout of flat events")
    _add_preprocess_arguments(prep)
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
            for name, part in config.sections.items():
                print(f"  {name}: {part.describe() if hasattr(part, 'describe') else part!r}")
        elif args.command == "preprocess":
            _preprocess(args)
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


#: The options that give a Parquet source's column roles (``StorageSpec``'s fields).
_ROLE_OPTIONS = ("recd", "group", "session_key", "session_columns", "item_key", "item_columns", "sparse",
                 "dense", "label", "order_by", "history", "user_key")


def _add_preprocess_arguments(prep: argparse.ArgumentParser) -> None:
    from recd_plugin.data.builtin import builtin_names

    prep.add_argument("source", help="Parquet file or directory (one row per sample; give its column roles), or a "
                                     f"built-in source: {', '.join(builtin_names())}")
    prep.add_argument("out", type=Path, help="output directory (written atomically, with a manifest)")
    prep.add_argument("--rows-per-file", type=int, default=1 << 20)
    prep.add_argument("--strict", action="store_true", help="refuse session/item columns that are not constant")
    prep.add_argument("--overwrite", action="store_true")
    roles = prep.add_argument_group("column roles of a Parquet source (a built-in source has its own; "
                                    "lists are comma separated; see docs/storage.md)")
    roles.add_argument("--recd", metavar="FLAG", help="the training flag (or @file.toml): session key and session "
                                                      "columns are its keyed group's key and features")
    roles.add_argument("--group", help="with --recd: the session group, when the flag keys several")
    roles.add_argument("--session-key", help="column naming the session (instead of --recd)")
    roles.add_argument("--session-columns", help="with --session-key: columns constant within a session")
    roles.add_argument("--item-key", help="column naming the item (required)")
    roles.add_argument("--item-columns", help="columns constant per item (default: the features of a flag group "
                                              "keyed by --item-key, else none)")
    roles.add_argument("--sparse", help="sparse features the reader emits (required)")
    roles.add_argument("--dense", help="dense features the reader emits (default: none)")
    roles.add_argument("--label", help="label column (default: label)")
    roles.add_argument("--order-by", help="sort key of the samples inside a session (default: input order)")
    roles.add_argument("--history", help="session-level list of the user's last item ids: stored by reference "
                                         "when it is a slice of the user's own events (needs --user-key)")
    roles.add_argument("--user-key", help="column naming the user")


def _names(text: Optional[str]) -> List[str]:
    return [c.strip() for c in text.split(",") if c.strip()] if text else []


def _parquet_spec(args: argparse.Namespace) -> "StorageSpec":
    """The column roles of a Parquet source, from the options (the storage layer knows none)."""
    from recd_plugin.errors import StorageError
    from recd_plugin.storage import StorageSpec

    missing = [need for need, ok in (("--recd FLAG (or --session-key COL)", args.recd or args.session_key),
                                     ("--item-key COL", args.item_key), ("--sparse A,B,...", args.sparse)) if not ok]
    if missing:
        raise StorageError(f"{args.source}: preprocess of a Parquet source needs its column roles: give "
                           f"{', '.join(missing)} (docs/storage.md); only the built-in sources carry their own")
    if args.recd and (args.session_key or args.session_columns):
        raise StorageError("give the session columns once: --recd, or --session-key with --session-columns")
    if args.group and not args.recd:
        raise StorageError("--group names a group of the --recd flag: give --recd too")
    common = dict(item_key=args.item_key, sparse_features=_names(args.sparse), dense_features=_names(args.dense),
                  label=args.label or "label", order_by=args.order_by, history=args.history, user_key=args.user_key)
    if args.recd:
        from recd_plugin.config import RecDConfig

        item_columns = None if args.item_columns is None else _names(args.item_columns)
        return StorageSpec.from_config(RecDConfig.load(args.recd), group=args.group, item_columns=item_columns,
                                       **common)
    return StorageSpec(session_key=args.session_key, session_columns=_names(args.session_columns),
                       item_columns=_names(args.item_columns), **common)


def _preprocess(args: argparse.Namespace) -> None:
    """``recd-plugin preprocess``: a built-in source with its own column roles, or a Parquet
    source with the roles its options give."""
    from recd_plugin.data.builtin import not_found_hint, resolve_data
    from recd_plugin.errors import StorageError
    from recd_plugin.storage import StorageSpec, preprocess
    from recd_plugin.storage.parquet_input import parquet_files

    found = resolve_data(args.source, StorageError)
    if isinstance(found, Path):
        parquet_files(found, StorageError, not_found_hint())  # a missing path is the first thing to fix
        source, spec = found, _parquet_spec(args)
    else:
        given = ["--" + o.replace("_", "-") for o in _ROLE_OPTIONS if getattr(args, o) is not None]
        if given:
            raise StorageError(f"{args.source} is a built-in source with its own column roles: drop "
                               f"{', '.join(given)} (they describe a Parquet source)")
        spec = StorageSpec(**found.storage_roles(StorageError))
        source = found.load().table
    print(preprocess(source, args.out, spec, rows_per_file=args.rows_per_file, strict=args.strict,
                     overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
