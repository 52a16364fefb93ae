"""DES's fused tables (recd_plugin.des.fused): the weight parameter is the TBE's storage, the
optimizer's state is the TBE's momentum, and bad fused_params get a DESError naming the fix.
The 2-rank equality with unsharded SGD / row-wise Adagrad is in integration_tests/test_des_sharded.py."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from recd_plugin.des.fused import DESFusedOptimizer, fusable, fused_tbe, fused_weight, momentum
from recd_plugin.errors import DESError

CPU = torch.device("cpu")


def test_weight_is_the_tbe_storage_and_updates_in_backward() -> None:
    tbe = fused_tbe([5, 3], 4, [0, 1], {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5}, CPU)
    w = fused_weight(tbe)
    assert w.shape == (8, 4) and hasattr(w, "_in_backward_optimizers")
    with torch.no_grad():
        w.copy_(torch.arange(32, dtype=torch.float32).view(8, 4))
    # one bag per feature: row 1 of table 0, row 2 of table 1 (= flat row 5 + 2)
    out = tbe(torch.tensor([1, 2]), torch.tensor([0, 1, 2]))
    assert torch.equal(out, torch.cat([w[1], w[7]]).view(1, 8).detach())
    before = w.detach().clone()
    out.sum().backward()  # gradient 1 everywhere it was read: SGD subtracts lr
    want = before.clone()
    want[[1, 7]] -= 0.5
    assert torch.equal(w.detach(), want)


def test_rowwise_adagrad_state_is_the_tbe_momentum() -> None:
    tbe = fused_tbe([4, 4], 8, [0, 1], {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}, CPU)
    w = fused_weight(tbe)
    opt = DESFusedOptimizer({"local_weights.dim8": w}, {"local_weights.dim8": tbe}, lr=0.1)
    with torch.no_grad():
        w.fill_(1.0)
    tbe(torch.tensor([3, 0]), torch.tensor([0, 1, 2])).pow(2).sum().backward()
    m = opt.state_dict()["state"]["local_weights.dim8"]["momentum1"]
    assert m.shape == (8,) and m[3] > 0 and m[4] > 0 and float(m[[0, 1, 2, 5, 6, 7]].abs().sum()) == 0.0
    assert momentum(tbe).data_ptr() == m.data_ptr()
    opt.param_groups[0]["lr"] = 0.01
    opt.step()  # passes the new learning rate to the TBE
    assert tbe.get_learning_rate() == pytest.approx(0.01)


def test_bad_fused_params_name_the_fix() -> None:
    with pytest.raises(DESError, match="EXACT_ROWWISE_ADAGRAD"):
        fused_tbe([4], 4, [0], {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.1}, CPU)
    with pytest.raises(DESError, match="optimizer"):
        fused_tbe([4], 4, [0], {"learning_rate": 0.1}, CPU)
    with pytest.raises(DESError, match="keys are those of FBGEMM"):
        fused_tbe([4], 4, [0], {"optimizer": EmbOptimType.EXACT_SGD, "learning_rat": 0.1}, CPU)
    assert fusable(16) and not fusable(1)
