"""Sharded training with the plugin: :func:`for_dmp` (sharders, planner hints and plan check
for DistributedModelParallel in one object; :mod:`.planner`),
per-rank padding of compact IKJTs (:mod:`.pad`), checkpoints (:mod:`.checkpoint`). See docs/distributed.md."""

from recd_plugin.sharding.checkpoint import Checkpointer, CheckpointError, Position, split_batches
from recd_plugin.sharding.pad import pad_to_max_over_ranks
from recd_plugin.sharding.planner import (ShardingSetup, constraints, explain, for_dmp, measure_unique_fraction,
                                         sharders)

__all__ = ["Checkpointer", "CheckpointError", "Position", "ShardingSetup", "constraints", "explain",
           "for_dmp", "measure_unique_fraction", "pad_to_max_over_ranks", "sharders", "split_batches"]
