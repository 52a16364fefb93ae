"""The built-in data sources by name: the one registry every command reads.

``recd-plugin preprocess``, ``profile`` and ``analyze`` take DATA as a Parquet path or one of
these names, and all three resolve it here (:func:`resolve_data`). So a name works in every
command, a misspelt one gets the same "did you mean" everywhere, and a command that cannot use
a source (preprocess needs an item key) refuses it naming the sources it can use.

====================  ======================================================================
``synthetic``         :func:`recd_plugin.data.generate_sessions` (seeded, about 64k rows)
``movielens-100k``    :func:`recd_plugin.data.load_movielens_100k` (fetched into the cache
                      when missing)
``criteo-synthetic``  :func:`recd_plugin.data.criteo.criteo_table`: independent impressions,
                      ``num_samples`` rows, tables capped at ``max_rows`` (default 10^6)
``criteo-sessions``   the same in sessions of 16 samples sharing ``C1..C13``, with a
                      ``session_id`` column
====================  ======================================================================

Every loader takes the same keyword arguments (``num_samples``, ``seed``, ``max_rows``); a
source ignores those it has no use for (MovieLens has one size and no seed), so a command can
pass its options without knowing which source it got.

Example::

    from recd_plugin.data.builtin import builtin_names, builtin_source
    builtin_names()                              # ('synthetic', 'movielens-100k', ...)
    data = builtin_source("criteo-sessions").load(num_samples=4096, seed=0)
    data.table, data.cardinalities               # pyarrow.Table, {"C1": 1460, ...}
    builtin_source("movielens-1m")               # DataSourceError: ... did you mean 'movielens-100k'?
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Type, Union

import pyarrow as pa
from torchrec.datasets.utils import Batch

from recd_plugin.data.criteo import SESSION, CriteoBatches, criteo_cardinalities, criteo_table
from recd_plugin.data.sessions import cardinalities, storage_roles
from recd_plugin.errors import DataSourceError, RecDError, did_you_mean

#: Rows of the generated sources without a size of their own (the criteo ones) by default.
DEFAULT_SAMPLES = 1 << 16
#: Table-size cap of the criteo sources by default: the FAE benchmark's, so predictions compare.
CRITEO_MAX_ROWS = 1_000_000
ErrorClass = Type[RecDError]
#: (num_samples, seed, max_rows) -> the table.
TableLoader = Callable[[int, int, int], pa.Table]
#: (num_batches, batch_size, seed, max_rows) -> (batches built on demand, cardinalities).
LazyBatches = Callable[[int, int, int, int], Tuple[Iterable[Batch], Dict[str, int]]]


@dataclass(frozen=True)
class BuiltinData:
    """A built-in source's rows and its embedding table sizes (``{sparse feature: rows}``)."""

    table: pa.Table
    cardinalities: Dict[str, int]


@dataclass(frozen=True)
class BuiltinSource:
    """One registry entry. ``fixed_size``: the source has a size of its own (``num_samples``
    is ignored and the table is the whole data set); ``no_storage``: why preprocess cannot
    take it ("" when it can)."""

    name: str
    summary: str
    fixed_size: bool
    loader: TableLoader
    roles: Optional[Callable[[], Dict[str, Any]]] = None
    no_storage: str = ""
    #: Batches built on demand, for a source whose whole table would be large while a
    #: profiler samples a few of its batches.
    lazy_batches: Optional[LazyBatches] = None

    def load(self, *, num_samples: Optional[int] = None, seed: int = 0,
             max_rows: Optional[int] = None) -> BuiltinData:
        """The table (``num_samples`` rows for generated sources, default ``DEFAULT_SAMPLES``;
        tables capped at ``max_rows``, default ``CRITEO_MAX_ROWS``) and its cardinalities."""
        table = self.loader(DEFAULT_SAMPLES if num_samples is None else num_samples, seed,
                            CRITEO_MAX_ROWS if max_rows is None else max_rows)
        return BuiltinData(table, cardinalities(table))

    def batches(self, num_batches: int, batch_size: int, *, seed: int = 0,
                max_rows: Optional[int] = None) -> Optional[Tuple[Iterable[Batch], Dict[str, int]]]:
        """Batches generated on demand and the cardinalities, or None when the source has no
        lazy form (load the table and batch it: ``TableBatches``)."""
        if self.lazy_batches is None:
            return None
        return self.lazy_batches(num_batches, batch_size, seed, CRITEO_MAX_ROWS if max_rows is None else max_rows)

    def storage_roles(self, error: ErrorClass = DataSourceError) -> Dict[str, Any]:
        """Keyword arguments of ``recd_plugin.storage.StorageSpec`` for this source; ``error``
        (the caller's class) when preprocess cannot take it, naming the sources it can."""
        if self.roles is None:
            usable = [s.name for s in _SOURCES.values() if s.roles is not None]
            raise error(f"{self.name} cannot be preprocessed: {self.no_storage}; the built-in sources "
                        f"preprocess takes: {', '.join(usable)}")
        return self.roles()


def _synthetic(num_samples: int, seed: int, max_rows: int) -> pa.Table:
    from recd_plugin.data.synthetic import generate_sessions

    return generate_sessions(seed=seed)


def _movielens(num_samples: int, seed: int, max_rows: int) -> pa.Table:
    from recd_plugin.data.movielens import load_movielens_100k

    return load_movielens_100k()


def _criteo(session: int) -> TableLoader:
    def load(num_samples: int, seed: int, max_rows: int) -> pa.Table:
        return criteo_table(num_samples, seed=seed, max_rows=max_rows, session=session)
    return load


def _criteo_lazy(session: int) -> LazyBatches:
    def batches(num_batches: int, batch_size: int, seed: int, max_rows: int) -> Tuple[Iterable[Batch], Dict[str, int]]:
        return (CriteoBatches(num_batches, batch_size, seed, max_rows, session=session),
                criteo_cardinalities(max_rows))
    return batches


_NO_ITEM = "it has no item column (the deduplicated layout needs a session key and an item key)"
_SOURCES: Dict[str, BuiltinSource] = {s.name: s for s in (
    BuiltinSource("synthetic", "generated sessions in the common format (seeded, about 64k rows)",
                  True, _synthetic, storage_roles),
    BuiltinSource("movielens-100k", "MovieLens-100k in the common format (fetched into the cache when missing)",
                  True, _movielens, storage_roles),
    BuiltinSource("criteo-synthetic", "Criteo-like independent impressions (C1..C26, I1..I13, label)",
                  False, _criteo(1), no_storage=_NO_ITEM, lazy_batches=_criteo_lazy(1)),
    BuiltinSource("criteo-sessions", "criteo-synthetic in sessions of 16 samples sharing C1..C13, with session_id",
                  False, _criteo(SESSION), no_storage=_NO_ITEM, lazy_batches=_criteo_lazy(SESSION)),
)}


def builtin_names() -> Tuple[str, ...]:
    """The names every command accepts as DATA, in a stable order."""
    return tuple(_SOURCES)


def unknown_source(name: str) -> str:
    """The message for a DATA that is neither a built-in name nor a path."""
    names = builtin_names()
    return (f"unknown data source {name!r}{did_you_mean(name, names)}: give a Parquet file or directory, "
            f"or one of the built-in sources {', '.join(names)}")


def builtin_source(name: str, error: ErrorClass = DataSourceError) -> BuiltinSource:
    """The entry of ``name``; ``error`` (the caller's class) naming the closest name otherwise."""
    if name not in _SOURCES:
        raise error(unknown_source(name))
    return _SOURCES[name]


def _looks_like_path(data: str) -> bool:
    return "/" in data or os.sep in data or bool(Path(data).suffix)


def resolve_data(data: str, error: ErrorClass = DataSourceError) -> Union[BuiltinSource, Path]:
    """A command's DATA argument: the built-in source of that name, else a Path when ``data``
    exists or looks like one (a separator or a suffix: ``events.parquet``, ``data/``), else
    ``error`` (unknown name, with "did you mean"). A name wins over a folder of the same name:
    write ``./synthetic`` for the folder. A missing path is left to the Parquet reader, whose
    message names the path (add :func:`not_found_hint`)."""
    if data in _SOURCES:
        return _SOURCES[data]
    if Path(data).exists() or _looks_like_path(data):
        return Path(data)
    raise error(unknown_source(data))


def not_found_hint() -> str:
    """Appended to "no such Parquet file": the other kind of DATA a command takes."""
    return f"; or name a built-in source: {', '.join(builtin_names())}"
