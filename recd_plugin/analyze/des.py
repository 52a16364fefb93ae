"""DES on your model: bytes each rank sends per training step, DES vs TorchRec table-wise.

::

    from recd_plugin.analyze.des import estimate_des
    est = estimate_des(model_config, pooling={"C1": 1.0, ...})
    est.saving            # 1 - DES bytes / TorchRec table-wise bytes
    est.table_wise, est.des   # {component: bytes per step per rank}

Analytic, counted the way ``recd_plugin.bench.comm.CommCounter`` (the DES benchmark) counts:
bytes a rank *sends* per training step (forward + backward), W ranks, B samples per rank,
tables spread evenly table-wise, so a share r = (W - 1) / W of every field's traffic leaves
its rank. Per field f: pooling L_f (mean ids per sample), dim D_f; 8-byte ids, 4-byte
lengths, 4-byte floats.

========================  ===========================================================
component                 bytes per rank and step
========================  ===========================================================
ids (both sides)          B r sum_f s_f (8 L_f + 4); s_f = 1 for DES (one id stream per
                          feature), 1 + [wide] for TorchRec (the wide term's 1-dim
                          table is a second table reading the feature: its ids travel too)
TorchRec pooled rows      2 B r sum_f (D_f + [wide]) 4  (forward rows + backward grads)
DES partials              2 (W - 1) B K 4, K = [fm](D + 1) + [wide] + [first_layer] H
                          (forward reduce-scatter + backward all-gather)
dense all-reduce (DDP)    2 r 4 P; P = parameters outside the embedding tables: TorchRec
                          (dense_in + sum_f D_f) H + H + rest, DES dense_in H + H + rest,
                          rest = the later MLP layers and the 1-wide output layer
========================  ===========================================================

Not included: the operators' few scalar biases, TorchRec's per-call split/length metadata
(tens of bytes), and any overlap or compression. ``analytic_embedding_saving`` is the
docs/des.md number, embedding traffic alone: 1 - K / sum_f D_f.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping

from recd_plugin.analyze.model import ModelConfig

ID_BYTES, LENGTH_BYTES, FLOAT_BYTES = 8, 4, 4


@dataclass
class DESEstimate:
    """Bytes per rank and training step by component, for both sides."""

    des: Dict[str, float]
    table_wise: Dict[str, float]
    partial_width: int  # K, floats per sample in DES's reduce-scatter
    analytic_embedding_saving: float
    config: ModelConfig

    @property
    def des_bytes(self) -> float:
        return sum(self.des.values())

    @property
    def table_wise_bytes(self) -> float:
        return sum(self.table_wise.values())

    @property
    def saving(self) -> float:
        """1 - DES bytes / TorchRec table-wise bytes (everything counted)."""
        return 1.0 - self.des_bytes / self.table_wise_bytes if self.table_wise_bytes else 0.0

    @property
    def ids_share_of_des(self) -> float:
        return self.des["ids"] / self.des_bytes if self.des_bytes else 0.0


def _rest_params(mlp: list) -> int:
    """Parameters of the MLP after its first layer, output layer (width 1) included."""
    widths = list(mlp) + [1]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def estimate_des(cfg: ModelConfig, pooling: Mapping[str, float]) -> DESEstimate:
    """The table above for ``cfg``; ``pooling[feature]`` is used where a table gives none."""
    w, b = cfg.world_size, cfg.batch_size
    r = (w - 1) / w
    wide = "wide" in cfg.operators
    fields = list(cfg.tables.values())
    pool = {t.name: (t.pooling if t.pooling is not None else float(pooling.get(t.feature, 1.0))) for t in fields}
    per_stream = sum(ID_BYTES * pool[t.name] + LENGTH_BYTES for t in fields)
    dims = sum(t.dim for t in fields)
    k = (fields[0].dim + 1 if "fm" in cfg.operators else 0) + int(wide) + cfg.hidden
    h = cfg.hidden
    rest = _rest_params(cfg.mlp) if h else 0
    p_tw = ((cfg.dense_features + dims) * h + h + rest) if h else 0
    p_des = (cfg.dense_features * h + h + rest) if h else 0
    table_wise = {
        "ids": b * r * per_stream * (1 + int(wide)),
        "pooled rows": 2 * b * r * (dims + int(wide) * len(fields)) * FLOAT_BYTES,
        "dense all-reduce": 2 * r * FLOAT_BYTES * p_tw,
    }
    des = {
        "ids": b * r * per_stream,
        "partials": 2 * (w - 1) * b * k * FLOAT_BYTES,
        "dense all-reduce": 2 * r * FLOAT_BYTES * p_des,
    }
    return DESEstimate(des=des, table_wise=table_wise, partial_width=k,
                       analytic_embedding_saving=1.0 - k / dims if dims else 0.0, config=cfg)
