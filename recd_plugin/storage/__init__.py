"""RecD storage: deduplicated, session-clustered datasets and readers that emit IKJTs.

Data flows ``preprocess`` (flat events -> layout on disk) -> ``DedupReader`` (layout -> IKJT
``Batch``) -> ``epoch_check`` (every sample exactly once). ``FlatReader`` / ``write_flat`` are
the plain-KJT baseline on the same data.

Example::

    from recd_plugin.data import load_movielens_100k, storage_roles
    from recd_plugin.storage import DedupReader, StorageSpec, epoch_check, preprocess
    table = load_movielens_100k()
    spec = StorageSpec(**storage_roles())   # the column roles: storage knows no data set's schema
    print(preprocess(table, "ml100k-recd", spec, rows_per_file=25_000))
    reader = DedupReader("ml100k-recd", batch_size=1024, shuffle=True, seed=0)
    epoch_check(reader, source=table)
"""

from recd_plugin.errors import StorageError
from recd_plugin.storage.check import EpochReport, count_epoch, epoch_check
from recd_plugin.storage.layout import Manifest, StorageSpec, read_manifest
from recd_plugin.storage.preprocess import PreprocessSummary, preprocess
from recd_plugin.storage.reader import DedupReader, FlatReader, pack_sessions, write_flat

__all__ = [
    "DedupReader",
    "EpochReport",
    "FlatReader",
    "Manifest",
    "PreprocessSummary",
    "StorageError",
    "StorageSpec",
    "count_epoch",
    "epoch_check",
    "pack_sessions",
    "preprocess",
    "read_manifest",
    "write_flat",
]
