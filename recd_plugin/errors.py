"""Errors raised by recd-plugin.

Every error names what is wrong and how to fix it, and is raised before any training state
is touched (at config parsing, at ``apply()``, or when the first batch is built). Catch
``RecDError`` to handle them all; docs/troubleshooting.md lists each one.
"""

import difflib
from typing import Sequence


def did_you_mean(name: str, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or ``""``: for error messages."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class RecDError(Exception):
    """Base class of all recd-plugin errors."""


class PeerRequirementError(RecDError, ImportError):
    """torch / torchrec / fbgemm missing or of a version the plugin does not support."""


class ConfigError(RecDError, ValueError):
    """The plugin flag, environment variable or TOML file is malformed, or an option given in
    code is not one the plugin takes (e.g. ``HotBatchScheduler(window=0)``)."""


class DedupSpecError(RecDError, ValueError):
    """A feature group names an unknown feature, or groups overlap."""


class MalformedBatchError(RecDError, ValueError):
    """A batch is not a well-formed KeyedJaggedTensor / Batch."""


class NotDeduplicableError(RecDError, ValueError):
    """A feature said to be constant within a session differs between its samples."""


class UnsupportedModelError(RecDError, ValueError):
    """The model cannot take the plugin as configured (unknown module, unsupported setup)."""


class DataSourceError(RecDError, ValueError):
    """A data source name that is not a built-in source (``recd_plugin.data.builtin``), or a
    built-in source that a command cannot use (e.g. one without an item key for preprocess).
    The commands raise their own class instead (``StorageError``, ``HotSetError``,
    ``AnalyzeError``) with the same message."""


class StorageError(RecDError, ValueError):
    """Input to preprocessing or a stored RecD dataset is missing, malformed or incomplete."""


class CheckpointError(RecDError, RuntimeError):
    """A checkpoint that cannot be written, or read back intact into this model and optimizer
    (damaged or edited files, another model, optimizer or data order)."""


class HotSetError(RecDError, ValueError):
    """FAE: a bad memory budget, a hot set that does not match the model's tables (stale or
    from another config), or ids outside a table."""


class ShardingError(RecDError, ValueError):
    """Distributed training: a sharding type, compute kernel or optimizer that cannot take the
    plugin's batches, or a collective set-up that does not match."""


class DESError(RecDError, ValueError):
    """DES (distributed equivalent substitution): an operator or placement names a table that
    does not exist, an operator is fed inputs that are not pooled sums (MEAN pooling, sequence
    / EmbeddingCollection outputs), or shapes that do not match its configuration."""


class OptionalDependencyError(RecDError, ImportError):
    """A tooling feature (plots, the analyze report) needs a package of an optional extra."""


class AnalyzeError(RecDError, ValueError):
    """``recd-plugin analyze``: the data cannot be read (missing file, corrupt Parquet, unknown
    source name), or the ``--model`` config does not match the data (unknown tables, bad
    fields)."""
