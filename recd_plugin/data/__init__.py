"""Data sources for recd-plugin: one common session-ordered table format, two sources.

* :func:`generate_sessions` -- synthetic, session-structured, deterministic by seed
  (the embedded default);
* :func:`load_movielens_100k` -- MovieLens-100k (GroupLens or RecBole layout, fetched into
  a cache when missing; never shipped);
* :class:`TableBatches` -- a table as consecutive ``torchrec.datasets.utils.Batch`` es;
* :func:`builtin_source` -- the built-in sources by the names every command takes
  (``synthetic``, ``movielens-100k``, ``criteo-synthetic``, ``criteo-sessions``:
  :mod:`recd_plugin.data.builtin`);
* :func:`storage_roles` -- the common format's column roles, for
  ``recd_plugin.storage.StorageSpec(**storage_roles())``.

Every source returns a ``pyarrow.Table``, one row per rating event, ordered by
(user_id, timestamp), with the columns ``session_id``, ``user_id``, ``user_age``,
``user_gender``, ``user_occupation``, ``user_zip``, ``history`` (list: the user's last
``HISTORY_LENGTH`` items before the session started), ``item_id``, ``item_genres`` (list),
``item_year``, ``timestamp``, ``dense_hour``, ``dense_year``, ``label``; the embedding table
sizes are in the schema metadata (:func:`cardinalities`).

Example::

    from recd_plugin.data import generate_sessions, TableBatches, cardinalities
    table = generate_sessions(seed=0)
    sizes = cardinalities(table)            # {"session_id": ..., "user_id": 2000, ...}
    batch = TableBatches(table, batch_size=1024)[0]
"""

from .batches import TableBatches, split_by_time
from .builtin import builtin_names, builtin_source
from .movielens import (
    MovieLensFormatError,
    MovieLensNotFoundError,
    default_root,
    fetch_movielens_100k,
    load_movielens_100k,
)
from .sessions import (
    DENSE_FEATURES,
    HISTORY_LENGTH,
    ITEM_FEATURES,
    SESSION_FEATURES,
    SESSION_GAP_SECONDS,
    SPARSE_FEATURES,
    build_session_table,
    cardinalities,
    sessionize,
    storage_roles,
)
from .synthetic import generate_sessions, simulate_events

__all__ = [
    "DENSE_FEATURES",
    "HISTORY_LENGTH",
    "ITEM_FEATURES",
    "SESSION_FEATURES",
    "SESSION_GAP_SECONDS",
    "SPARSE_FEATURES",
    "MovieLensFormatError",
    "MovieLensNotFoundError",
    "TableBatches",
    "build_session_table",
    "builtin_names",
    "builtin_source",
    "cardinalities",
    "default_root",
    "fetch_movielens_100k",
    "generate_sessions",
    "load_movielens_100k",
    "sessionize",
    "simulate_events",
    "split_by_time",
    "storage_roles",
]
