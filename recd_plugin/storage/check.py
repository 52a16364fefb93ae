"""Per-epoch exactly-once check: count samples and sum labels against the manifest / source.

Example::

    reader = DedupReader("/data/ml100k-recd", batch_size=1024)
    report = epoch_check(reader)                       # manifest taken from the reader
    report = epoch_check(DataLoader(reader, batch_size=None, num_workers=2),
                         reader.manifest, source=table)   # also against the source table
    print(report)                                      # samples 100,000 = 100,000 ...

Run it once per rank and add the reports (``EpochReport.merge``) when the readers are sharded.
Labels are 0/1 (or small integers) in float32, so their sum is exact in float64. NaN labels
(which preprocess refuses, but a flat file or source table may hold) are counted apart and
left out of the sum: one NaN would make every sum NaN, and NaN never equals NaN, so the check
would report lost samples that were all delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Union

import numpy as np
import pyarrow as pa
from torchrec.datasets.utils import Batch

from recd_plugin.errors import StorageError
from recd_plugin.storage.layout import Manifest


@dataclass
class EpochReport:
    samples: int
    label_sum: float  # sum of the labels that are not NaN
    batches: int
    expected_samples: Optional[int] = None
    expected_label_sum: Optional[float] = None
    nan_labels: int = 0

    @classmethod
    def merge(cls, reports: List["EpochReport"]) -> "EpochReport":
        """Sum of per-rank reports (expected values are taken from the first)."""
        return cls(sum(r.samples for r in reports), sum(r.label_sum for r in reports),
                   sum(r.batches for r in reports), reports[0].expected_samples, reports[0].expected_label_sum,
                   sum(r.nan_labels for r in reports))

    def __str__(self) -> str:
        return (f"samples {self.samples:,} = {self.expected_samples if self.expected_samples is not None else '?':,}"
                f"  label sum {self.label_sum:.1f} = {self.expected_label_sum}  batches {self.batches}")


def count_epoch(batches: Iterable[Batch]) -> EpochReport:
    """One pass over ``batches``: samples (labels per batch) and label sum."""
    samples = nb = nans = 0
    total = 0.0
    for batch in batches:
        labels = batch.labels.double()
        samples += int(labels.numel())
        total += float(labels.nansum())
        nans += int(labels.isnan().sum())
        nb += 1
    return EpochReport(samples, total, nb, nan_labels=nans)


def _compare(report: EpochReport, samples: int, label_sum: float, nan_labels: int, what: str) -> None:
    if report.samples != samples:
        raise StorageError(f"epoch delivered {report.samples} samples but {what} has {samples}: "
                           f"{'lost' if report.samples < samples else 'duplicated'} "
                           f"{abs(report.samples - samples)} samples")
    if report.nan_labels != nan_labels:
        raise StorageError(f"epoch delivered {report.nan_labels} NaN labels but {what} has {nan_labels}: "
                           "samples were lost, duplicated or altered")
    if not np.isclose(report.label_sum, label_sum, rtol=1e-9, atol=1e-6):
        raise StorageError(f"epoch label sum {report.label_sum} differs from {what}'s {label_sum}: "
                           "samples were lost, duplicated or altered")


def epoch_check(reader: Union[Iterable[Batch], "object"], manifest: Optional[Manifest] = None, *,
                source: Optional[pa.Table] = None, label: Optional[str] = None) -> EpochReport:
    """Read one epoch from ``reader`` and compare it with ``manifest`` totals (and ``source``).

    ``manifest`` defaults to ``reader.manifest`` (a :class:`DedupReader`). Raises
    StorageError on any difference; returns the report.
    """
    manifest = manifest if manifest is not None else getattr(reader, "manifest", None)
    if manifest is None and source is None:  # before reading an epoch for nothing
        raise StorageError("epoch_check needs a manifest (or a DedupReader) or a source table to compare with")
    report = count_epoch(reader)  # type: ignore[arg-type]
    if manifest is not None:
        report.expected_samples = int(manifest.totals["samples"])
        report.expected_label_sum = float(manifest.totals["label_sum"])
        # preprocess refuses NaN labels, so a dataset holds none
        _compare(report, report.expected_samples, report.expected_label_sum, 0, "the manifest")
    if source is not None:
        label = label or (manifest.spec.label if manifest is not None else "label")
        y = source.column(label).to_numpy().astype(np.float64)
        src_sum, src_nans = float(np.nansum(y)), int(np.isnan(y).sum())
        if report.expected_samples is None:
            report.expected_samples, report.expected_label_sum = source.num_rows, src_sum
        _compare(report, source.num_rows, src_sum, src_nans, "the source")
    return report
