"""DES: distributed equivalent substitution for FM, wide and first-dense-layer operators.

See docs/des.md. Unsharded, the operators are plain modules with the standard math; sharded
with :class:`DESSharder` (a TorchRec ``ModuleSharder``) each rank computes the operators'
partial results on the embedding rows it owns and only those partials are reduce-scattered.

Example::

    from recd_plugin.des import DESEmbeddingOperators, FactorizationMachine, WideLinear, DESSharder, des_plan
"""

from recd_plugin.des.module import DESEmbeddingOperators, resolve_fields
from recd_plugin.des.operators import DESOperator, FactorizationMachine, FirstDenseLayer, WideLinear, stack_fields
from recd_plugin.des.sharded import ShardedDESEmbeddingOperators
from recd_plugin.des.sharder import DESSharder, balanced_placement, des_plan

__all__ = [
    "DESEmbeddingOperators", "DESOperator", "DESSharder", "FactorizationMachine", "FirstDenseLayer",
    "ShardedDESEmbeddingOperators", "WideLinear", "balanced_placement", "des_plan", "resolve_fields", "stack_fields",
]
