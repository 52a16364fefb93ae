"""Bad FAE hot sets and bad DES inputs: each is a clear plugin error, never a silent result.

Hot sets (issue 12, items 11 and 15): rows that are floats, strings, booleans or 2-D are
refused (``np.asarray(..., dtype=int64)`` used to cast them); a hot set file that is empty,
truncated, has a malformed header, or has any single bit flipped either loads exactly as
saved or raises HotSetError (format 1 silently dropped a table's rows when a bit of its
member name flipped); a consistent edit the zip CRC cannot see fails the SHA-256; a save
killed mid-write leaves the previous file.

DES (item 19): placements that are bools, world sizes < 1, a batch missing a feature, ids
outside their table (unsharded and sharded on a one-rank gloo group, where a table-wise id
past its table used to read the next table's row of the flat local weight), all DESError
before any lookup.

Constructor arguments (FAE's ``HotBatchScheduler`` / ``HotColdEmbeddingBagCollection`` /
``compare_tiers``: ConfigError; DES operators: DESError): a bad value is a plugin error that
names it and the allowed values, where plain ValueErrors (or a silent split of a string into
one-letter table names) used to be.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recd_plugin.des import (DESEmbeddingOperators, DESSharder, FactorizationMachine, FirstDenseLayer, WideLinear,
                             balanced_placement, des_plan)
from recd_plugin.errors import ConfigError, DESError, HotSetError, RecDError
from recd_plugin.fae.hotcold import HotColdEmbeddingBagCollection, convert_hot_cold
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.fae.schedule import HotBatchScheduler
from recd_plugin.fae.trace import AccessTrace, compare_tiers
from recd_plugin.sparse.ids import first_bad_id

ROOT = Path(__file__).resolve().parents[1]

# -- hot sets ---------------------------------------------------------------------------------


def make_hot() -> HotSet:
    return HotSet(tables={"t_a": TableShape(100, 4), "t_b": TableShape(50, 8)},
                  rows={"t_a": np.array([1, 5, 7, 99]), "t_b": np.array([0, 3])}, budget_bytes=1000,
                  info={"seed": 3, "hot_sample_fraction": 0.25})


def same(a: HotSet, b: HotSet) -> bool:
    return (a.tables == b.tables and a.budget_bytes == b.budget_bytes and a.info == b.info
            and a.rows.keys() == b.rows.keys() and all(np.array_equal(a.rows[t], b.rows[t]) for t in a.rows))


def read_members(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_members(path: Path, header: Any, arrays: Dict[str, np.ndarray]) -> None:
    """A well-formed zip (valid CRCs) with this header and these members: what an edit makes."""
    np.savez(path, **arrays, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "hot.npz"
    make_hot().save(path)
    return path


@pytest.mark.parametrize("rows, what", [
    (np.array([1.5, 2.7]), "float64"), (np.array([1.0, 2.0]), "float64"), (np.array(["1", "2"]), "<U1"),
    ([True, False], "bool"), (np.array([[1, 2]]), r"shape \(1, 2\)"), (np.array(3), r"shape \(\)"),
])
def test_hot_rows_that_are_not_integer_ids_are_refused(rows: Any, what: str) -> None:
    # before: floats and strings were cast (1.5 -> 1, "2" -> 2) and 2-D raised numpy's ValueError
    with pytest.raises(HotSetError, match=rf"table 't_a'.*{what}.*(integer|1-D).*re-run `recd-plugin profile`"):
        HotSet(tables={"t_a": TableShape(10, 4)}, rows={"t_a": rows}, budget_bytes=100)


def test_integer_rows_of_any_width_and_empty_rows_are_accepted() -> None:
    hot = HotSet(tables={"t_a": TableShape(10, 4), "t_b": TableShape(10, 4)},
                 rows={"t_a": np.array([1, 4], dtype=np.uint8), "t_b": []}, budget_bytes=100)
    assert hot.rows["t_a"].dtype == np.int64 and hot.rows["t_a"].tolist() == [1, 4] and hot.rows["t_b"].size == 0


def test_float_rows_in_a_file_are_refused_naming_the_table(saved: Path) -> None:
    members = read_members(saved)
    header = json.loads(bytes(members.pop("__header__")).decode())
    members["rows/t_b"] = members["rows/t_b"].astype(np.float64) + 0.5
    write_members(saved, header, members)
    with pytest.raises(HotSetError, match=r"hot.npz: hot rows of table 't_b' are float64"):
        HotSet.load(saved)


def _drop(key: str):
    return lambda h: {k: v for k, v in h.items() if k != key}


HEADER_EDITS = {
    "no tables": (_drop("tables"), "has no 'tables'"),
    "no budget": (_drop("budget_bytes"), "has no 'budget_bytes'"),
    "no checksum": (_drop("sha256"), "has no 'sha256'"),
    "a list": (lambda h: [h], "is a JSON list, not an object"),
    "format 1": (lambda h: {**h, "format_version": 1}, "format 1 .*before hot sets carried a checksum"),
    "tables a list": (lambda h: {**h, "tables": list(h["tables"])}, "'tables' is .* expected a JSON dict"),
    "budget a bool": (lambda h: {**h, "budget_bytes": True}, "'budget_bytes' is True"),
    "rows negative": (lambda h: {**h, "tables": {**h["tables"], "t_a": {"num_embeddings": -4, "embedding_dim": 4}}},
                      "table 't_a' num_embeddings=-4"),
    "shape unknown key": (lambda h: {**h, "tables": {**h["tables"], "t_a": {"rows": 4}}}, "entry of table 't_a'"),
    "rows of no table": (lambda h: {**h, "row_tables": ["t_a"]}, r"lists hot rows for tables \['t_a'\], the file holds"),
    "budget edited": (lambda h: {**h, "budget_bytes": 999}, "content checksum mismatch"),
}


@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_malformed_header_is_named(saved: Path, edit: str) -> None:
    change, message = HEADER_EDITS[edit]
    members = read_members(saved)
    header = json.loads(bytes(members.pop("__header__")).decode())
    write_members(saved, change(header), members)
    with pytest.raises(HotSetError, match=message):
        HotSet.load(saved)


def test_empty_missing_and_non_zip_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(HotSetError, match="not a readable hot set: the file is empty.*re-run `recd-plugin profile`"):
        HotSet.load(tmp_path / "empty.npz")
    with pytest.raises(HotSetError, match="not a readable hot set.*check the path"):
        HotSet.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("tables = 1\n")
    with pytest.raises(HotSetError, match="not a readable hot set.*re-run"):
        HotSet.load(tmp_path / "text.npz")


def test_a_consistent_edit_of_the_rows_fails_the_checksum(saved: Path) -> None:
    # the zip's CRC-32 is rewritten with the edit: only the recorded SHA-256 can see it
    members = read_members(saved)
    header = json.loads(bytes(members.pop("__header__")).decode())
    members["rows/t_a"] = np.array([1, 5, 8, 99])
    write_members(saved, header, members)
    with pytest.raises(HotSetError, match="content checksum mismatch.*re-run `recd-plugin profile`"):
        HotSet.load(saved)
    del members["rows/t_b"]  # a table's rows gone: format 1 loaded this as "no hot rows"
    header["row_tables"] = ["t_a"]
    write_members(saved, header, members)
    with pytest.raises(HotSetError, match="content checksum mismatch"):
        HotSet.load(saved)


def test_every_single_bit_flip_is_refused_or_harmless(saved: Path, tmp_path: Path) -> None:
    # exhaustive over the ~9k bits of the file; format 1 gave a different hot set for 80 of
    # them (the 'rows/' prefix of a member name) and raw numpy / zip errors for 80 more
    data, want = saved.read_bytes(), make_hot()
    flipped = tmp_path / "flipped.npz"
    refused = 0
    for pos in range(len(data)):
        for bit in range(8):
            b = bytearray(data)
            b[pos] ^= 1 << bit
            flipped.write_bytes(bytes(b))
            try:
                got = HotSet.load(flipped)
            except HotSetError:
                refused += 1
                continue
            assert same(got, want), f"byte {pos} bit {bit}: a different hot set loaded silently"
    assert refused > len(data) * 4  # most bits matter; the rest are zip timestamps and the like


def test_every_truncation_is_refused(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    cut = tmp_path / "cut.npz"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(HotSetError, match="not a readable hot set"):
            HotSet.load(cut)


KILL_MID_SAVE = """
import os, signal, sys, zipfile
import numpy as np
from recd_plugin.fae.hotset import HotSet, TableShape
def die(self):  # the members written, the zip's directory not yet: SIGKILL
    self.fp.flush()
    os.kill(os.getpid(), signal.SIGKILL)
zipfile.ZipFile.close = die
HotSet(tables={"t_a": TableShape(100, 4)}, rows={"t_a": np.arange(50)}, budget_bytes=800).save(sys.argv[1])
"""


def test_a_save_killed_mid_write_leaves_the_previous_hot_set(saved: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(saved)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert same(HotSet.load(saved), make_hot())
    left = [p.name for p in saved.parent.iterdir() if p.name != saved.name]
    assert all(n.startswith(".hot.npz.") and n.endswith(".tmp") for n in left), left  # never under the real name


def test_save_appends_npz_like_numpy_and_refuses_info_json_cannot_hold(tmp_path: Path) -> None:
    make_hot().save(tmp_path / "hot")
    assert same(HotSet.load(tmp_path / "hot.npz"), make_hot()) and sorted(p.name for p in tmp_path.iterdir()) == ["hot.npz"]
    bad = make_hot()
    bad.info["seen"] = np.int64(3)
    with pytest.raises(HotSetError, match="info is not JSON-serializable.*int\\(x\\)"):
        bad.save(tmp_path / "bad.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hot.npz"]  # nothing written


# -- FAE constructor arguments ----------------------------------------------------------------


def hot_ebc() -> Any:
    from torchrec import EmbeddingBagCollection

    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_a", feature_names=["t_a"], num_embeddings=100, embedding_dim=4),
        EmbeddingBagConfig(name="t_b", feature_names=["t_b"], num_embeddings=50, embedding_dim=8)])


@pytest.mark.parametrize("window", [0, -3, True, 2.5, "8"])
def test_scheduler_window_that_is_not_a_batch_count_is_a_config_error(window: Any) -> None:
    # before: ValueError for 0 and -3, a TypeError for "8", and True / 2.5 were taken
    with pytest.raises(ConfigError, match=rf"HotBatchScheduler: window must be an integer >= 1 .*or None to classify "
                                          rf"batches only.*got {window!r}"):
        HotBatchScheduler([], make_hot(), window=window)
    assert HotBatchScheduler([], make_hot(), window=np.int64(2)).window == 2  # numpy counts are counts
    assert HotBatchScheduler([], make_hot(), window=None).window is None


def test_scheduler_map_and_callback_of_the_wrong_kind_are_config_errors() -> None:
    # before: dict(["t_a"]) raised "dictionary update sequence element #0 has length 3"
    with pytest.raises(ConfigError, match=r"feature_to_table must map features to hot-set tables.*got list"):
        HotBatchScheduler([], make_hot(), feature_to_table=["t_a"])
    with pytest.raises(ConfigError, match=r"on_switch must be a callable.*got str"):
        HotBatchScheduler([], make_hot(), on_switch="sync")


@pytest.mark.parametrize("remap", ["fast", "Table", None, 1])
def test_hot_cold_remap_kind_outside_the_allowed_ones_is_a_config_error(remap: Any) -> None:
    ebc = hot_ebc()
    with pytest.raises(ConfigError, match=r"remap must be one of \['auto', 'table', 'search'\], got " + repr(remap)):
        HotColdEmbeddingBagCollection(ebc, make_hot(), remap=remap)
    model = torch.nn.Sequential(ebc)
    with pytest.raises(ConfigError, match="remap must be one of"):
        convert_hot_cold(model, make_hot(), remap=remap)
    assert model[0] is ebc  # refused before anything was swapped
    assert isinstance(HotColdEmbeddingBagCollection(ebc, make_hot(), remap="search"), torch.nn.Module)


def test_hot_cold_remap_suggests_the_close_name_and_tables_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match=r"got 'tabel' \(did you mean 'table'\?\)"):
        HotColdEmbeddingBagCollection(hot_ebc(), make_hot(), remap="tabel")
    # before: "t_a" became the tables 't', '_', 'a' and the error named table 't'
    with pytest.raises(ConfigError, match=r"tables must be a list of table names, got the string 't_a'; "
                                          r"write tables=\['t_a'\]"):
        HotColdEmbeddingBagCollection(hot_ebc(), make_hot(), tables="t_a")


def test_compare_tiers_warmup_outside_the_trace_is_a_config_error() -> None:
    trace = AccessTrace(["t_a"], np.array([0, 100]), [np.array([1, 2]), np.array([5])], [2, 1])
    for bad in (-1, 2, True, 0.5):
        with pytest.raises(ConfigError, match=r"warmup_steps must be an integer in \[0, 2\).*got "):
            compare_tiers(trace, make_hot(), warmup_steps=bad)
    assert compare_tiers(trace, make_hot(), warmup_steps=1).warmup_steps == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"embedding_dim": 0}, "embedding_dim must be an integer >= 1, got 0"),
    ({"out_features": -2}, "out_features must be an integer >= 1, got -2"),
    ({"dense_in_features": 1.5}, "dense_in_features must be an integer >= 0, got 1.5"),
    ({"embedding_dim": True}, "embedding_dim must be an integer >= 1, got True"),
])
def test_first_dense_layer_sizes_are_named(kwargs: Dict[str, Any], match: str) -> None:
    # before: ZeroDivisionError (no fan-in) or torch's "negative dimension" without the argument's name
    with pytest.raises(DESError, match=match):
        FirstDenseLayer(**{"tables": ["t_a"], "embedding_dim": 4, "out_features": 3, **kwargs})


def test_des_operator_tables_given_as_one_string_are_refused() -> None:
    for op in (FactorizationMachine, WideLinear):
        with pytest.raises(DESError, match=rf"{op.__name__} tables must be a list of table names, got the string "
                                           r"'t_a'; write tables=\['t_a'\]"):
            op("t_a")
    with pytest.raises(DESError, match="got the string"):
        FirstDenseLayer("t_a", embedding_dim=4, out_features=3)


def test_argument_errors_are_plugin_errors_and_still_value_errors() -> None:
    """``except RecDError`` catches them; code that caught the old ValueError still does."""
    assert issubclass(ConfigError, RecDError) and issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        HotBatchScheduler([], make_hot(), window=0)


# -- DES placements ---------------------------------------------------------------------------


def des_tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name="t_a", feature_names=["a"], num_embeddings=10, embedding_dim=4),
            EmbeddingBagConfig(name="t_b", feature_names=["b"], num_embeddings=6, embedding_dim=4),
            EmbeddingBagConfig(name="w_a", feature_names=["a"], num_embeddings=8, embedding_dim=1)]


def make_des(**kwargs: Any) -> DESEmbeddingOperators:
    torch.manual_seed(0)
    return DESEmbeddingOperators(des_tables(), {"fm": FactorizationMachine(["t_a", "t_b"]), "wide": WideLinear(["w_a"])},
                                 **kwargs)


@pytest.mark.parametrize("where", [True, False, 1.0, "1", "rowwise", None])
def test_placement_that_is_not_a_rank_is_refused(where: Any) -> None:
    # before: True placed the table on rank 1 (bool is an int), then TorchRec raised a ValueError
    with pytest.raises(DESError, match=r"placement of 't_a' is .*use a rank in \[0, 2\) or 'row_wise'"):
        des_plan(make_des(), {"t_a": where, "t_b": 0, "w_a": 1}, world_size=2)


def test_bool_placement_says_it_is_a_bool_and_numpy_ranks_are_ranks() -> None:
    with pytest.raises(DESError, match=r"is True \(a bool, not a rank\)"):
        des_plan(make_des(), {"t_a": True, "t_b": 0, "w_a": 1}, world_size=2)
    plan = des_plan(make_des(), {"t_a": np.int64(1), "t_b": 0, "w_a": "row_wise"}, world_size=2)
    assert plan["t_a"].ranks == [1] and plan["w_a"].sharding_type == "row_wise"


@pytest.mark.parametrize("world_size", [0, -1, True, 2.0, "2"])
def test_world_size_below_one_or_not_an_int_is_refused(world_size: Any) -> None:
    # before: balanced_placement(world_size=0) raised min()'s "arg is an empty sequence"
    with pytest.raises(DESError, match=r"balanced_placement got world_size=.*integer >= 1"):
        balanced_placement(des_tables(), world_size)
    with pytest.raises(DESError, match=r"des_plan got world_size=.*integer >= 1"):
        des_plan(make_des(), {"t_a": 0, "t_b": 0, "w_a": 0}, world_size)


def test_row_wise_threshold_must_be_a_row_count() -> None:
    for bad in (-1, True, 2.5):
        with pytest.raises(DESError, match="row_wise_above=.*row count >= 0"):
            balanced_placement(des_tables(), 2, row_wise_above=bad)
    assert balanced_placement(des_tables(), 2, row_wise_above=7) == {"t_a": "row_wise", "w_a": "row_wise", "t_b": 0}


def test_verify_batches_must_be_a_count() -> None:
    for bad in (True, -2, 1.0):
        with pytest.raises(DESError, match="verify_batches must be an integer"):
            make_des(verify_batches=bad)


# -- DES inputs -------------------------------------------------------------------------------


def kjt(bags: Dict[str, List[List[int]]]) -> KeyedJaggedTensor:
    keys = list(bags)
    return KeyedJaggedTensor(keys=keys, values=torch.tensor([v for k in keys for bag in bags[k] for v in bag], dtype=torch.long),
                             lengths=torch.tensor([len(bag) for k in keys for bag in bags[k]], dtype=torch.int32))


def test_missing_feature_is_refused_before_any_lookup() -> None:
    des = make_des()
    looked_up = []
    des.ebc.register_forward_pre_hook(lambda *_: looked_up.append(1))
    # before: TorchRec's KeyError 'b' from inside the EBC
    with pytest.raises(DESError, match=r"no feature\(s\) \['b'\].*keys: \['a'\].*Feed every feature"):
        des(kjt({"a": [[1], [2]]}))
    assert not looked_up


LIMIT = {"a": ("w_a", 8), "b": ("t_b", 6)}  # "a" is read by t_a (10 rows) and w_a (8 rows): 8


@st.composite
def batches(draw: Any) -> Dict[str, List[List[int]]]:
    b = draw(st.integers(1, 4))
    keys = draw(st.permutations(["a", "b", "extra"]))
    return {k: [draw(st.lists(st.integers(-3, 12), max_size=3)) for _ in range(b)] for k in keys}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_ids_outside_their_table_are_named_or_the_output_is_the_ebc(bags: Dict[str, List[List[int]]]) -> None:
    des = make_des()
    first_bad = next(((k, v) for k in bags if k in LIMIT for bag in bags[k] for v in bag
                      if not 0 <= v < LIMIT[k][1]), None)
    if first_bad is None:
        out = des(kjt(bags))
        pooled = des.ebc(kjt(bags))
        torch.testing.assert_close(out["wide"], pooled["a@w_a"] + des.operators["wide"].bias)
        return
    k, v = first_bad
    table, n = LIMIT[k]
    with pytest.raises(DESError, match=rf"feature '{k}': id {v} is outside table '{table}' \(rows 0..{n - 1}\)"):
        des(kjt(bags))


@pytest.fixture
def one_rank() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("placement", [{"t_a": 0, "t_b": 0, "w_a": 0}, {"t_a": "row_wise", "t_b": 0, "w_a": 0}])
def test_sharded_des_refuses_ids_outside_their_table(one_rank: None, placement: Dict[str, Any]) -> None:
    from torchrec.distributed.types import ShardingEnv

    des = make_des()
    sharded = DESSharder().shard(des, des_plan(des, placement, world_size=1), ShardingEnv.from_process_group(dist.group.WORLD))
    good = {"a": [[1, 7]], "b": [[5]]}
    torch.testing.assert_close(sharded(kjt(good))["fm"], des(kjt(good))["fm"])
    # b's ids follow a's 10 rows in the flat local weight: before, -3 read t_a's row 7
    for bags, msg in (({"a": [[1]], "b": [[-3]]}, "feature 'b': id -3 is outside table 't_b'"),
                      ({"a": [[9]], "b": [[0]]}, r"feature 'a': id 9 is outside table 'w_a' \(rows 0..7\)"),
                      ({"a": [[1]]}, r"no feature\(s\) \['b'\]")):
        with pytest.raises(DESError, match=msg):
            sharded(kjt(bags))


def test_first_bad_id_on_cpu_is_always_exact() -> None:
    values, rows = torch.tensor([0, 3, 2, 5, 1]), torch.tensor([4, 3])
    assert first_bad_id(values, [2, 3], rows) == (1, 5)  # "3" is in [0, 4); 5 is not in [0, 3)
    assert first_bad_id(values, [2, 3], rows, exact=False) == (1, 5)  # CPU: no sync to save
    assert first_bad_id(torch.tensor([-1]), [1], torch.tensor([4])) == (0, -1)
    assert first_bad_id(torch.zeros(0, dtype=torch.long), [0], torch.tensor([4])) is None
    assert first_bad_id(torch.tensor([-5, 99, 2]), [2, 1], torch.tensor([-1, 3])) is None  # -1: never looked up


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_first_bad_id_on_cuda_does_not_sync_unless_exact() -> None:
    values, rows = torch.tensor([0, 3, 2, 1], device="cuda"), torch.tensor([4, 3], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert first_bad_id(values, [2, 2], rows, exact=False) is None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first_bad_id(values, [2, 2], rows, exact=True) is None
    assert first_bad_id(values, [1, 3], rows, exact=True) == (1, 3)
