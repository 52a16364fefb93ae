"""FAE: profile embedding accesses, keep hot rows in fast memory, schedule all-hot batches.

See docs/fae.md. ``recd-plugin profile`` (or :func:`profile_accesses`) writes a
:class:`HotSet` (:func:`build_report` / :func:`plot_coverage` show the profile's coverage);
the flag ``fae.hot_set=...`` then swaps in the hot/cold layout (:func:`convert_hot_cold`,
registered with ``apply`` by :mod:`.convert`) and the batch scheduler (:class:`HotBatchScheduler`);
:func:`planner_constraints` / :class:`ProfileCacheStatistics` feed TorchRec's planner.
"""

from recd_plugin.fae.coverage import ProfileReport, build_report, plot_coverage
from recd_plugin.fae.hints import ProfileCacheStatistics, planner_constraints, show_plans
from recd_plugin.fae.hotcold import HotColdEmbeddingBagCollection, convert_hot_cold
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.fae.profile import AccessProfile, profile_accesses
from recd_plugin.fae.schedule import HotBatchScheduler, ScheduledBatch

__all__ = [
    "AccessProfile", "HotBatchScheduler", "HotColdEmbeddingBagCollection", "HotSet", "ProfileCacheStatistics",
    "ProfileReport", "ScheduledBatch", "TableShape", "build_report", "convert_hot_cold", "plot_coverage",
    "planner_constraints", "profile_accesses", "show_plans",
]
