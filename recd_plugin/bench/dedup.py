"""``python -m recd_plugin.bench dedup``: RecD dedup speedup on MovieLens-100k, measured.

Trains the example two-tower model (examples/movielens/model.py; ``transformer`` variant and
``light``) on session-ordered MovieLens-100k, plain TorchRec vs the plugin, in one process:
same initial weights, same batches, SGD, the two sides alternating in blocks of one pass over
the batches. Reports
samples/s of each side and their ratio (median step times after warm-up), the unique
fraction of the deduplicated group, the fraction f of the plain step spent in deduplicable
work, the Amdahl bound 1/((1-f)+f*u), the IKJT build time as % of the plugin's step, and the
largest per-step loss difference.

f is measured, not estimated: the example's training step is also timed with the user side
(user and history embeddings, history encoder, user tower: all that reads only session
features) computed once, from the batch's longest-history sample (same padding length), and
broadcast to the batch. That is the work perfect deduplication would leave (per-call costs
such as dense table gradients included); f = 1 - T_fixed / T_plain. The plugin's own costs
(building IKJTs, expanding rows back to the batch) count against its ratio, not the bound.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import torch
from tqdm import tqdm

import recd_plugin
from recd_plugin.bench.report import load_example, machine, median, publish, timed
from recd_plugin.data import TableBatches, cardinalities, load_movielens_100k
from recd_plugin.sparse.ikjt import build_ikjt, jagged_index_select
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

LOSS_TOLERANCE = 1e-5    # per step, SGD (Adagrad divides by the root of tiny squared gradients,
                         # which amplifies 1e-9 float-order noise into visible weight differences)
WEIGHT_TOLERANCE = 1e-4  # any weight after all steps


def _example() -> Any:
    return load_example("examples/movielens/model.py", "recd_example_model")


def _sample(kjt: KeyedJaggedTensor, sample: int) -> KeyedJaggedTensor:
    """A batch of one: sample ``sample`` of ``kjt`` (every key)."""
    b = kjt.stride()
    rows = torch.arange(len(kjt.keys())) * b + sample
    values, lengths, _ = jagged_index_select(kjt.values(), kjt.lengths(), rows)
    return KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=lengths.to(kjt.lengths().dtype), stride=1)


def _fixed_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any, single: KeyedJaggedTensor) -> None:
    """The example's training step with the user side run on one sample, broadcast to B."""
    opt.zero_grad(set_to_none=True)
    user = model.user_tower(single).expand(batch.labels.numel(), -1)
    logits = (user * model.item_tower(batch.sparse_features, batch.dense_features)).sum(dim=1)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    opt.step()


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any) -> float:
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(batch.sparse_features, batch.dense_features), batch.labels)
    loss.backward()
    opt.step()
    return loss.item()


def run_variant(light: bool, batches: List[Any], card: Dict[str, int], rounds: int, warmup_rounds: int,
                seed: int, verbose: bool = False) -> Dict[str, Any]:
    example = _example()
    torch.manual_seed(seed)
    plain = example.TwoTower(card, light=light)
    plugin = copy.deepcopy(plain)
    config = recd_plugin.RecDConfig.from_string(example.RECD_FLAG)
    plugin, loader = recd_plugin.apply(config, plugin, batches)
    spec = config.spec
    ikjt_batches = list(loader)

    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05)
    opt_plugin = torch.optim.SGD(plugin.parameters(), lr=0.05)
    singles = [_sample(b.sparse_features, int(torch.argmax(b.sparse_features["history"].lengths()))) for b in batches]
    # Blocks of one pass over the batches per side, alternating plain / plugin / fixed step,
    # `rounds` times: alternation controls the machine's drift, and within a block each
    # side runs warm, as in training (step-by-step alternation leaves every step cache-cold
    # from the other side, which penalizes the smaller step most).
    t_plain: List[float] = []
    t_plugin: List[float] = []
    t_fixed: List[float] = []
    build: List[float] = []
    fixed = copy.deepcopy(plain)
    opt_fixed = torch.optim.SGD(fixed.parameters(), lr=0.05)
    losses_plain: List[float] = []
    losses_plugin: List[float] = []
    for r in tqdm(range(rounds), desc=f"dedup bench, {'light' if light else 'transformer'} (rounds)", leave=False, disable=None):
        keep = r >= warmup_rounds
        for b in batches:
            t = timed(lambda: losses_plain.append(_step(plain, opt_plain, b)))
            t_plain += [t] if keep else []
        for b, ib in zip(batches, ikjt_batches):
            # The build as the transform does it in the training process, right before the step.
            tb = timed(lambda: build_ikjt(b.sparse_features, spec))
            t = timed(lambda: losses_plugin.append(_step(plugin, opt_plugin, ib)))
            t_plugin += [t] if keep else []
            build += [tb] if keep else []
        # For f: the plain training step with the user side computed once, from the batch's
        # longest-history sample, and broadcast: what perfect deduplication leaves.
        for b, single in zip(batches, singles):
            t = timed(lambda: _fixed_step(fixed, opt_fixed, b, single))
            t_fixed += [t] if keep else []
    # Same initial weights, same batches in the same order, SGD: step k of both sides must agree,
    # and so must the weights after all steps (equal gradients at every step).
    loss_diff = max(abs(a - b) for a, b in zip(losses_plain, losses_plugin))
    trained = plugin.state_dict()
    weight_diff = max(float((w - trained[name]).abs().max()) for name, w in plain.state_dict().items() if w.numel())
    if verbose:
        print(f"per-step ms ({'light' if light else 'transformer'}):\n","plain", [round(1e3 * x, 1) for x in t_plain], "\nplugin", [round(1e3 * x, 1) for x in t_plugin], "\nfixed", [round(1e3 * x, 1) for x in t_fixed])

    # The same builds back to back, caches warm: what a DataLoader worker pays per batch.
    warm = [timed(lambda b=b: build_ikjt(b.sparse_features, spec)) for _ in range(3) for b in batches]
    history_len = [int(b.sparse_features["history"].lengths().max()) for b in batches]

    bsz = batches[0].labels.numel()
    step_plain, step_plugin = median(t_plain), median(t_plugin)
    u = loader.stats.unique_fraction("user")
    f = max(0.0, 1.0 - median(t_fixed) / step_plain)
    bound = 1.0 / ((1.0 - f) + f * u)
    ratio = step_plain / step_plugin
    lengths = torch.cat([b.sparse_features["history"].lengths() for b in batches]).float()
    padding = 1.0 - float(lengths.sum()) / (bsz * sum(history_len))
    return {
        "ratio": ratio,
        "bound": bound,
        "ratio_of_bound": ratio / bound,
        "unique_fraction": u,
        "f": f,
        "build_pct": 100.0 * median(build) / step_plugin,
        "max_loss_diff": loss_diff,
        "max_weight_diff": weight_diff,
        "samples_per_s_plain": bsz / step_plain,
        "samples_per_s_plugin": bsz / step_plugin,
        "step_ms_plain": 1e3 * step_plain,
        "step_ms_plugin": 1e3 * step_plugin,
        "fixed_step_ms": 1e3 * median(t_fixed),
        "build_ms": 1e3 * median(build),
        "build_ms_warm": 1e3 * median(warm),
        "padding_share": padding,
    }


def run(quick: bool = False, json_path: str | None = None, batch_size: int = 1024, seed: int = 0,
        write_docs: bool = True, verbose: bool = False) -> Dict[str, Any]:
    table = load_movielens_100k()
    card = cardinalities(table)
    ds = TableBatches(table, batch_size, drop_last=True)
    count = 6 if quick else 16
    # Batches spread over the whole (user-ordered) data set, not only its first users.
    batches = [ds[i] for i in torch.linspace(0, len(ds) - 1, count).long().tolist()]
    rounds, warmup_rounds = (2, 1) if quick else (4, 1)
    result: Dict[str, Any] = {
        "batch_size": batch_size, "steps": (rounds - warmup_rounds) * count, "machine": machine(), "quick": quick,
        "variants": {
            "transformer": run_variant(False, batches, card, rounds, warmup_rounds, seed, verbose),
            "light": run_variant(True, batches, card, rounds, warmup_rounds, seed, verbose),
        },
    }
    _print(result)
    publish("dedup", _markdown(result), result, json_path, write_docs)
    for name, v in result["variants"].items():
        if v["max_loss_diff"] > LOSS_TOLERANCE or v["max_weight_diff"] > WEIGHT_TOLERANCE:
            raise SystemExit(
                f"dedup benchmark: the plugin and plain TorchRec diverged on {name!r} (max loss diff "
                f"{v['max_loss_diff']:.1e}, max weight diff {v['max_weight_diff']:.1e}): a bug, please report it"
            )
    return result


def _rows(result: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    return list(result["variants"].items())


def _print(result: Dict[str, Any]) -> None:
    print(f"RecD dedup, MovieLens-100k, batch {result['batch_size']}, {result['machine']}")
    print(f"{'variant':12}{'plain/s':>10}{'plugin/s':>10}{'ratio':>8}{'bound':>8}{'of bound':>9}"
          f"{'unique':>8}{'f':>7}{'build%':>8}{'max dloss':>11}")
    for name, v in _rows(result):
        print(f"{name:12}{v['samples_per_s_plain']:10.0f}{v['samples_per_s_plugin']:10.0f}{v['ratio']:8.2f}"
              f"{v['bound']:8.2f}{100 * v['ratio_of_bound']:8.0f}%{v['unique_fraction']:8.3f}{v['f']:7.3f}"
              f"{v['build_pct']:8.2f}{v['max_loss_diff']:11.1e}")


def _markdown(result: Dict[str, Any]) -> str:
    lines = [
        "## RecD dedup (`python -m recd_plugin.bench dedup" + (" --quick" if result["quick"] else "") + "`)",
        "",
        f"MovieLens-100k in session order, batch {result['batch_size']}, example two-tower model, "
        f"SGD, plain TorchRec and the plugin alternating in blocks of one pass over the same "
        f"batches, median of {result['steps']} steps per side after a warm-up pass. Machine: {result['machine']}. Both sides run in "
        "one process with `MALLOC_TRIM_THRESHOLD_` and `MALLOC_MMAP_THRESHOLD_` set to 1 GiB.",
        "",
        "| variant | plain samples/s | plugin samples/s | ratio | Amdahl bound | ratio / bound | "
        "unique fraction u | dedup fraction f | IKJT build % of step | max loss diff | max weight diff | padding share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in _rows(result):
        lines.append(
            f"| {name} | {v['samples_per_s_plain']:.0f} | {v['samples_per_s_plugin']:.0f} | "
            f"{v['ratio']:.2f} | {v['bound']:.2f} | {100 * v['ratio_of_bound']:.0f}% | "
            f"{v['unique_fraction']:.3f} | {v['f']:.3f} | {v['build_pct']:.2f} | "
            f"{v['max_loss_diff']:.1e} | {v['max_weight_diff']:.1e} | {v['padding_share']:.2f} |")
    lines += [
        "",
        "`transformer`: history through a 2-layer transformer encoder, padded to the batch's longest "
        "history (the padding share is the fraction of padded positions). `light`: history "
        "mean-pooled, no encoder. f = 1 - T_fixed / T_plain, where T_fixed is the same training "
        "step with the user side computed once (from the batch's longest-history sample) and "
        "broadcast: the work perfect deduplication leaves. The bound 1/((1-f)+f*u) assumes the "
        "user side costs the same per row at U rows as at B rows; a ratio above the bound means "
        "it costs less (small batches fit in cache). The IKJT build runs in the training process "
        "here, right before each step (caches cold from the previous step, the costly case); the "
        "JSON's `build_ms_warm` is the same build back to back, what a DataLoader worker pays "
        "(the default `in_workers` moves it off the training loop). Both sides' weights "
        "after all steps differ by at most the max weight diff. Step times on a small shared "
        "machine vary between runs (here about 10% on the plugin side); `--verbose` prints every step.",
    ]
    return "\n".join(lines)
