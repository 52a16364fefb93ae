"""Checkpoint / resume in one process (recd_plugin.sharding.checkpoint): exact resume of the
optimizer state, refusal of checkpoints that do not fit (nothing changed), corrupted and edited
files (flipped bits, truncation, edited manifest / position / latest), and DCP failures
turned into CheckpointError. Multi-process cases and killed saves: integration_tests/
test_checkpoint_faults.py.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recd_plugin.errors import RecDError
from recd_plugin.sharding import ckpt_files
from recd_plugin.sharding.checkpoint import Checkpointer, CheckpointError, Position, split_batches

XS = [torch.randn(8, 3, generator=torch.Generator().manual_seed(i)) for i in range(12)]


class Net(nn.Module):
    """[B, 3] -> [B, 1]; ``head`` adds a submodule (a model the checkpoint does not fit)."""

    def __init__(self, hidden: int = 4, head: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.head = nn.Linear(1, 1) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.head(y) if self.head is not None else y


OPTIMIZERS: Dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),  # no state at all
    "keyed_adam": lambda m: KeyedOptimizerWrapper(dict(m.named_parameters()), lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "keyed_sgd": lambda m: KeyedOptimizerWrapper(dict(m.named_parameters()), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "combined": lambda m: CombinedOptimizer([
        ("first", KeyedOptimizerWrapper(dict(m.body[0].named_parameters()),
                                        lambda ps: torch.optim.Adagrad(ps, lr=0.1))),
        ("last", KeyedOptimizerWrapper(dict(m.body[2].named_parameters()),
                                       lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)))]),
}


def build(kind: str, seed: int, **net: Any) -> Tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net(**net)
    return model, OPTIMIZERS[kind](model)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> List[float]:
    losses = []
    for i in steps:
        optimizer.zero_grad()
        loss = model(XS[i]).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    return copy.deepcopy((model.state_dict(), optimizer.state_dict()))


def assert_same(a: Any, b: Any) -> None:
    """Bit-identical nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (list(a), list(b))
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b, (a, b)


def saved(tmp: Path, kind: str = "adam", steps: int = 5, every: int = 5) -> Checkpointer:
    """A checkpoint of ``kind`` after ``steps`` steps."""
    model, optimizer = build(kind, seed=1)
    train(model, optimizer, range(steps))
    ckpt = Checkpointer(tmp, every)
    ckpt.save(steps, model, optimizer, Position(epoch=0, samples=8 * steps))
    return ckpt


# ------------------------------------------------------------------------- item 1: exact resume


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_resume_continues_exactly_like_an_uninterrupted_run(kind: str, tmp_path: Path) -> None:
    model, optimizer = build(kind, seed=1)
    straight = train(model, optimizer, range(10))
    ckpt = saved(tmp_path, kind)
    fresh, fresh_optimizer = build(kind, seed=2)  # other initial weights, empty optimizer state
    position = ckpt.resume(fresh, fresh_optimizer)
    assert position == Position(step=5, epoch=0, samples=40, seed=0)
    assert train(fresh, fresh_optimizer, range(5, 10)) == straight[5:]
    assert_same(fresh.state_dict(), model.state_dict())
    assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())


def test_a_parameter_without_optimizer_state_resumes_exactly(tmp_path: Path) -> None:
    """Adam keeps no state for a parameter that never had a gradient: it must get none on
    resume either (torch's state-dict helper would otherwise give it a zero step)."""
    def run(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> List[float]:
        model.head.weight.requires_grad_(steps.start >= 5)  # the head trains only after step 5
        return train(model, optimizer, steps)

    model, optimizer = build("adam", seed=1, head=True)
    straight = run(model, optimizer, range(5)) + run(model, optimizer, range(5, 10))
    model, optimizer = build("adam", seed=1, head=True)
    run(model, optimizer, range(5))
    Checkpointer(tmp_path, 5).save(5, model, optimizer, Position())
    fresh, fresh_optimizer = build("adam", seed=2, head=True)
    Checkpointer(tmp_path, 5).resume(fresh, fresh_optimizer)
    assert run(fresh, fresh_optimizer, range(5, 10)) == straight[5:]


def test_a_keyed_optimizer_missing_lazy_state_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """TorchRec's keyed optimizers load the state of every parameter: a checkpoint whose job
    never stepped one is refused, and the zero-gradient step that created the state is undone."""
    def decaying(model: nn.Module) -> torch.optim.Optimizer:
        # weight decay: the zero-gradient step of init_state moves the weights, which must be undone
        return KeyedOptimizerWrapper(dict(model.named_parameters()),
                                     lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.5))

    torch.manual_seed(1)
    model = Net(head=True)
    optimizer = decaying(model)
    model.head.weight.requires_grad_(False)
    train(model, optimizer, range(5))
    Checkpointer(tmp_path, 5).save(5, model, optimizer, Position())
    fresh = Net(head=True)
    fresh_optimizer = decaying(fresh)
    before = snapshot(fresh, fresh_optimizer)
    with pytest.raises(CheckpointError, match="never stepped some parameters"):
        Checkpointer(tmp_path, 5).resume(fresh, fresh_optimizer)
    assert_same(snapshot(fresh, fresh_optimizer), before)
    assert all(p.grad is None for p in fresh.parameters())


def test_saving_before_the_first_step_does_not_change_the_optimizer(tmp_path: Path) -> None:
    model, optimizer = build("adam", seed=1)
    straight = train(model, optimizer, range(4))
    model, optimizer = build("adam", seed=1)
    Checkpointer(tmp_path, 1).save(0, model, optimizer, Position())
    assert train(model, optimizer, range(4)) == straight
    fresh, fresh_optimizer = build("adam", seed=2)
    Checkpointer(tmp_path, 1).resume(fresh, fresh_optimizer)
    assert train(fresh, fresh_optimizer, range(4)) == straight


# -------------------------------------------------- item 3 / 11: refused, and nothing changed


@pytest.mark.parametrize("saved_kind,resumed_kind", [("adam", "sgd_momentum"), ("sgd_momentum", "adam"),
                                                     ("adam", "keyed_adam"), ("keyed_adam", "combined")])
def test_another_optimizer_type_is_refused_and_changes_nothing(saved_kind: str, resumed_kind: str,
                                                              tmp_path: Path) -> None:
    ckpt = saved(tmp_path, saved_kind)
    model, optimizer = build(resumed_kind, seed=2)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match="optimizer state was saved by .*resume\\(model, None\\)"):
        ckpt.resume(model, optimizer)
    assert_same(snapshot(model, optimizer), before)
    # Said explicitly: the weights only, the optimizer starts fresh.
    assert ckpt.resume(model, None).step == 5
    reference, _ = build(saved_kind, seed=1)
    train(reference, OPTIMIZERS[saved_kind](reference), range(5))
    assert_same(model.state_dict(), reference.state_dict())
    assert_same(optimizer.state_dict(), before[1])


def keyed(make: Callable[[Any], torch.optim.Optimizer]) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: KeyedOptimizerWrapper(dict(m.named_parameters()), make)


def combined(last_momentum: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: CombinedOptimizer([
        ("first", keyed(lambda ps: torch.optim.Adagrad(ps, lr=0.1))(m.body[0])),
        ("last", keyed(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=last_momentum))(m.body[2]))])


#: (saved optimizer, resumed optimizer: same type, another configuration, what the message names)
OTHER_CONFIGURATIONS = {
    "momentum_dropped": (OPTIMIZERS["sgd_momentum"], lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                         r"optim SGD momentum=0.9 in the checkpoint, 0 here.*optim: \['momentum_buffer'\]"),
    "momentum_added": (OPTIMIZERS["sgd"], lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                       r"optim SGD momentum=0 in the checkpoint, 0.9 here.*optim: none"),
    "amsgrad": (OPTIMIZERS["adam"], lambda m: torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True),
                r"optim Adam amsgrad=False in the checkpoint, True here.*\['exp_avg', 'exp_avg_sq', 'step'\]"),
    "betas": (OPTIMIZERS["adam"], lambda m: torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.5, 0.9)),
              r"optim Adam betas=\[0.9, 0.999\] in the checkpoint, \[0.5, 0.9\] here"),
    "adagrad_decay": (OPTIMIZERS["adagrad"], lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.1),
                      r"optim Adagrad lr_decay=0 in the checkpoint, 0.1 here.*\['step', 'sum'\]"),
    "keyed_momentum_dropped": (keyed(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)), OPTIMIZERS["keyed_sgd"],
                               r"optim SGD momentum=0.9 in the checkpoint, 0 here"),
    "combined_part": (combined(0.9), combined(0.0), r"optim\[last\] SGD momentum=0.9 in the checkpoint, 0.0 here"),
}


@pytest.mark.parametrize("case", sorted(OTHER_CONFIGURATIONS))
def test_another_optimizer_configuration_is_refused_before_anything_is_loaded(case: str, tmp_path: Path) -> None:
    """Same optimizer type, other hyperparameters: torch's load would silently put the saved
    ones back (or TorchRec's would drop the saved state); refused, naming the setting and the fix."""
    make_saved, make_resumed, match = OTHER_CONFIGURATIONS[case]
    torch.manual_seed(1)
    model = Net()
    optimizer = make_saved(model)
    train(model, optimizer, range(5))
    ckpt = Checkpointer(tmp_path, 5)
    ckpt.save(5, model, optimizer, Position())

    torch.manual_seed(2)
    fresh = Net()
    fresh_optimizer = make_resumed(fresh)
    before = snapshot(fresh, fresh_optimizer)
    with pytest.raises(CheckpointError, match="saved with another optimizer configuration: " + match) as caught:
        ckpt.resume(fresh, fresh_optimizer)
    assert "Resume with the optimizer configuration the checkpoint was saved with, or start from a fresh " \
           "checkpoint directory" in str(caught.value)
    assert_same(snapshot(fresh, fresh_optimizer), before)
    # The saved configuration resumes that same checkpoint exactly.
    again = make_saved(fresh)
    assert ckpt.resume(fresh, again).step == 5
    assert_same(fresh.state_dict(), model.state_dict())
    assert_same(again.state_dict(), optimizer.state_dict())


def test_the_manifest_records_each_optimizers_configuration_but_not_its_lr(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Net()
    saved_with = combined(0.9)(model)
    Checkpointer(tmp_path, 5).save(5, model, saved_with, Position())
    record = ckpt_files.read_manifest(tmp_path / "step-00000005")["optimizer_config"]
    assert [(p["part"], p["type"]) for p in record["optim"]] == [("first", "Adagrad"), ("last", "SGD")]
    assert record["optim"][1]["hyperparameters"]["momentum"] == 0.9
    assert not {"lr", "foreach", "fused", "differentiable"} & set(record["optim"][0]["hyperparameters"])


def test_lr_kernel_switches_and_scheduled_momentum_do_not_refuse_a_resume(tmp_path: Path) -> None:
    """What LR schedules change (lr, OneCycleLR's cycled momentum in the param groups) and
    kernel switches (foreach) are not compared: the resume continues exactly, with the
    schedule's saved state, as an uninterrupted run."""
    def build_scheduled(seed: int, foreach: bool) -> Tuple[nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(seed)
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5 if seed == 2 else 0.1, momentum=0.9,
                                    foreach=foreach)
        return model, optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)

    def run(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, steps: range) -> List[float]:
        losses = []
        for i in steps:
            losses += train(model, optimizer, range(i, i + 1))
            schedule.step()
        return losses

    model, optimizer, schedule = build_scheduled(1, foreach=False)
    straight = run(model, optimizer, schedule, range(10))
    model, optimizer, schedule = build_scheduled(1, foreach=False)
    run(model, optimizer, schedule, range(5))
    Checkpointer(tmp_path, 5).save(5, model, optimizer, Position())
    schedule_state = copy.deepcopy(schedule.state_dict())  # the job's own to keep (e.g. Position.extra)

    fresh, fresh_optimizer, fresh_schedule = build_scheduled(2, foreach=True)
    assert fresh_optimizer.param_groups[0]["momentum"] != optimizer.param_groups[0]["momentum"]  # cycled
    assert Checkpointer(tmp_path, 5).resume(fresh, fresh_optimizer).step == 5
    fresh_schedule.load_state_dict(schedule_state)
    assert run(fresh, fresh_optimizer, fresh_schedule, range(5, 10)) == straight[5:]


def test_a_checkpoint_without_a_configuration_record_still_resumes_and_still_names_other_state(
        tmp_path: Path) -> None:
    """Checkpoints of earlier versions have no record: they resume as before, and a keyed
    optimizer that creates other state than the saved one is refused by name, not by a count."""
    ckpt = saved(tmp_path, "keyed_adam")
    rewrite_manifest(tmp_path, lambda m: m.pop("optimizer_config"))
    model, optimizer = build("keyed_adam", seed=2)
    assert ckpt.resume(model, optimizer).step == 5

    other = tmp_path / "momentum"
    torch.manual_seed(1)
    model = Net()
    optimizer = keyed(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))(model)
    train(model, optimizer, range(5))
    Checkpointer(other, 5).save(5, model, optimizer, Position())
    rewrite_manifest(other, lambda m: m.pop("optimizer_config"))
    fresh, fresh_optimizer = build("keyed_sgd", seed=2)
    before = snapshot(fresh, fresh_optimizer)
    with pytest.raises(CheckpointError, match=r"optimizer state of 'body.0.bias': the checkpoint has "
                                              r"\['momentum_buffer'\], this optimizer creates \[\]: it was saved "
                                              "with another optimizer configuration"):
        Checkpointer(other, 5).resume(fresh, fresh_optimizer)
    assert_same(snapshot(fresh, fresh_optimizer), before)
    assert all(p.grad is None for p in fresh.parameters())


@pytest.mark.parametrize("net,match", [
    ({"head": True}, "no 'model.head.weight' in the checkpoint"),
    ({"hidden": 5}, "'model.body.0.weight' has shape \\[5, 3\\] here, \\[4, 3\\] in the checkpoint"),
])
def test_a_model_the_checkpoint_does_not_fit_is_refused_and_changes_nothing(net: dict, match: str,
                                                                           tmp_path: Path) -> None:
    ckpt = saved(tmp_path)
    model, optimizer = build("adam", seed=2, **net)
    train(model, optimizer, range(2))  # a live optimizer state, which must survive as it is
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=match):
        ckpt.resume(model, optimizer)
    assert_same(snapshot(model, optimizer), before)


def test_a_model_missing_a_submodule_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    model, optimizer = build("adam", seed=1, head=True)
    train(model, optimizer, range(5))
    ckpt = Checkpointer(tmp_path, 5)
    ckpt.save(5, model, optimizer, Position())
    smaller, smaller_optimizer = build("adam", seed=2)  # no head: DCP alone would load the rest silently
    before = snapshot(smaller, smaller_optimizer)
    with pytest.raises(CheckpointError, match="holds 'model.head.weight', which the model does not have"):
        ckpt.resume(smaller, smaller_optimizer)
    assert_same(snapshot(smaller, smaller_optimizer), before)


# --------------------------------------------------------- item 4: corruption, verified on read


PRISTINE: Dict[str, Path] = {}


def pristine() -> Path:
    """One saved checkpoint directory, shared by the property tests (copied per example)."""
    if "dir" not in PRISTINE:
        PRISTINE["dir"] = Path(tempfile.mkdtemp(prefix="recd-ckpt-"))
        atexit.register(shutil.rmtree, PRISTINE["dir"], True)
        saved(PRISTINE["dir"] / "ckpt")
        assert [p.name for p in step_files(PRISTINE["dir"] / "ckpt")] == [
            ".metadata", "__0_0.distcp", "manifest.json", "position.json"]
    return PRISTINE["dir"] / "ckpt"


def step_files(directory: Path) -> List[Path]:
    return sorted((directory / "step-00000005").iterdir())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 3), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_in_any_checkpoint_file_is_refused_and_changes_nothing(which: int, where: float,
                                                                            bit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(shutil.copytree(pristine(), Path(tmp) / "ckpt"))
        target = step_files(directory)[which]  # .metadata, a shard, manifest.json, position.json
        data = bytearray(target.read_bytes())
        data[int(where * len(data))] ^= 1 << bit
        target.write_bytes(bytes(data))
        model, optimizer = build("adam", seed=2)
        before = snapshot(model, optimizer)
        with pytest.raises(CheckpointError, match="damaged|edited"):
            Checkpointer(directory, 5).resume(model, optimizer)
        assert_same(snapshot(model, optimizer), before)


@pytest.mark.parametrize("verify", [True, False])
def test_a_truncated_shard_is_refused_even_without_content_hashes(verify: bool, tmp_path: Path) -> None:
    ckpt = saved(tmp_path)
    ckpt.verify = verify
    shard = next(p for p in step_files(tmp_path) if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-100])
    model, optimizer = build("adam", seed=2)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=f"{shard.name} has .* bytes, .* were written .*truncated"):
        ckpt.resume(model, optimizer)
    assert_same(snapshot(model, optimizer), before)


def test_verify_false_skips_the_content_hashes(tmp_path: Path, monkeypatch) -> None:
    """The documented speed switch: shards are not hashed on resume (sizes still are)."""
    saved(tmp_path)

    def hashed(path: Path) -> dict:
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(ckpt_files, "file_digest", hashed)
    model, optimizer = build("adam", seed=2)
    assert Checkpointer(tmp_path, 5, verify=False).resume(model, optimizer).step == 5
    with pytest.raises(CheckpointError, match="was hashed"):
        Checkpointer(tmp_path, 5, verify=True).resume(model, optimizer)


def rewrite_manifest(directory: Path, edit: Callable[[dict], None]) -> None:
    """Edit the manifest as a buggy or malicious writer would: with a consistent own checksum."""
    path = directory / "step-00000005"
    body = ckpt_files.read_manifest(path)
    edit(body)
    ckpt_files.write_manifest(path, body["step"], body["world_size"], body["optimizer"], body["files"],
                              body.get("optimizer_config"))


@pytest.mark.parametrize("edit,match", [
    (lambda d: (d / "step-00000005" / "manifest.json").write_text("{}"), "manifest.json is damaged or was edited"),
    (lambda d: (d / "step-00000005" / "manifest.json").write_bytes(b"\x00\xff" * 9), "manifest.json is damaged"),
    (lambda d: (d / "step-00000005" / "manifest.json").unlink(), "latest names step-00000005, which is missing"),
    (lambda d: rewrite_manifest(d, lambda m: m["files"][".metadata"].update(sha256="0" * 64)),
     r"\.metadata does not match the sha256"),
    (lambda d: rewrite_manifest(d, lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": ""}})),
     "manifest.json is damaged or was edited"),
    (lambda d: rewrite_manifest(d, lambda m: m["files"].pop("position.json")), "has no position.json"),
    (lambda d: rewrite_manifest(d, lambda m: m["files"].pop("__0_0.distcp")),
     r"\['__0_0.distcp'\] are not in its manifest"),
])
def test_an_edited_manifest_is_refused(edit: Callable[[Path], None], match: str, tmp_path: Path) -> None:
    ckpt = saved(tmp_path)
    edit(tmp_path)
    model, optimizer = build("adam", seed=2)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=match):
        ckpt.resume(model, optimizer)
    assert_same(snapshot(model, optimizer), before)


# ------------------------------------------------- items 11 / 18: position.json and latest


@pytest.mark.parametrize("content,match", [
    (b"[]", "must be an object with the fields"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not valid JSON"),
    (b'{"step": 5, "epoch": 0, "samples": -8, "seed": 0, "extra": {}}', "'samples' must be an integer >= 0"),
    (b'{"step": 5, "epoch": 0, "batch": 2}', "must be an object with the fields"),
])
def test_a_malformed_position_is_refused_and_changes_nothing(content: bytes, match: str, tmp_path: Path) -> None:
    """Written consistently (manifest re-hashed): the position itself must be checked."""
    ckpt = saved(tmp_path)
    (tmp_path / "step-00000005" / "position.json").write_bytes(content)
    rewrite_manifest(tmp_path, lambda m: m["files"].update(
        {"position.json": ckpt_files.file_digest(tmp_path / "step-00000005" / "position.json")}))
    model, optimizer = build("adam", seed=2)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=f"position.json.*{match}"):
        ckpt.resume(model, optimizer)
    assert_same(snapshot(model, optimizer), before)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.dictionaries(st.sampled_from(["step", "epoch", "samples", "seed", "extra", "x"]),
                         st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats() | st.text(max_size=3)
                         | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2), st.integers()),
                         ).map(lambda d: json.dumps(d).encode()))
def test_any_position_file_is_a_position_or_a_checkpoint_error(content: bytes) -> None:
    try:
        position = Position.from_json(content, "position.json")
    except CheckpointError as e:
        assert "position.json" in str(e) and "start from an empty checkpoint directory" in str(e)
    else:
        assert Position.from_json(position.to_json().encode(), "again") == position


@pytest.mark.parametrize("content,match", [
    (b"", "must hold the name of a checkpoint directory"),
    (b"\xff\xfe\x00s\x00t", "must hold the name of a checkpoint directory"),
    (b"../../etc", "must hold the name of a checkpoint directory"),
    (b"step-00000009\n", "names step-00000009, which is missing or incomplete"),
])
def test_a_malformed_latest_is_refused(content: bytes, match: str, tmp_path: Path) -> None:
    ckpt = saved(tmp_path)
    (tmp_path / "latest").write_bytes(content)
    model, optimizer = build("adam", seed=2)
    with pytest.raises(CheckpointError, match=match):
        ckpt.resume(model, optimizer)


def test_no_latest_means_nothing_to_resume(tmp_path: Path) -> None:
    model, optimizer = build("adam", seed=2)
    assert Checkpointer(tmp_path / "new", 5).resume(model, optimizer) is None
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / ".step-00000005.tmp").mkdir()  # a save killed before its first commit
    assert Checkpointer(tmp_path / "new", 5).resume(model, optimizer) is None


@pytest.mark.parametrize("position,match", [
    ([], "must be a recd_plugin.sharding.Position, got list"),
    ({"epoch": 0, "batch": 2}, "must be a recd_plugin.sharding.Position, got dict"),
])
def test_a_bad_position_is_refused_before_anything_is_written(position: Any, match: str, tmp_path: Path) -> None:
    model, optimizer = build("adam", seed=1)
    with pytest.raises(CheckpointError, match=match):
        Checkpointer(tmp_path / "ckpt", 5).save(5, model, optimizer, position)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("fields,match", [
    ({"extra": {"loss": torch.tensor(0.5)}}, "'extra' is not JSON-serializable"),
    ({"extra": {"loss": float("nan")}}, "'extra' is not JSON-serializable"),
    ({"samples": 2.5}, "'samples' must be an integer >= 0"),
    ({"epoch": True}, "'epoch' must be an integer >= 0"),
])
def test_a_position_that_cannot_be_stored_is_refused_when_made(fields: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        Position(**fields)


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "5"])
def test_a_bad_interval_is_refused(every: Any, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="interval must be an integer >= 1"):
        Checkpointer(tmp_path, every)


# ------------------------------------------------- item 12: DCP's failures as CheckpointError


def test_a_failing_write_is_a_checkpoint_error_and_keeps_the_previous_checkpoint(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    ckpt = saved(tmp_path)
    model, optimizer = build("adam", seed=1)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full)
    with pytest.raises(CheckpointError, match="could not save to checkpoint .*No space left.*previous checkpoint is "
                                              "untouched") as caught:
        ckpt.save(10, model, optimizer, Position())
    assert isinstance(caught.value, Exception) and isinstance(caught.value, RecDError)
    assert ckpt.latest().name == "step-00000005"
    monkeypatch.undo()
    assert Checkpointer(tmp_path, 5).resume(*build("adam", seed=2)).step == 5
    ckpt.save(10, model, optimizer, Position())  # the next save clears the killed one's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000005", "step-00000010"]


def test_a_failing_read_is_a_checkpoint_error_and_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    ckpt = saved(tmp_path)
    model, optimizer = build("adam", seed=2)
    before = snapshot(model, optimizer)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("read error")

    monkeypatch.setattr(FileSystemReader, "read_data", broken)
    with pytest.raises(CheckpointError, match="could not load checkpoint .*RuntimeError: read error"):
        ckpt.resume(model, optimizer)
    assert_same(snapshot(model, optimizer), before)


def test_an_interrupt_inside_dcp_stays_an_interrupt(tmp_path: Path, monkeypatch) -> None:
    ckpt = saved(tmp_path)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemReader, "read_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.resume(*build("adam", seed=2))


# ----------------------------------------------------------------------- atomic publication


def test_saving_the_latest_step_again_is_refused(tmp_path: Path) -> None:
    ckpt = saved(tmp_path)
    model, optimizer = build("adam", seed=1)
    with pytest.raises(CheckpointError, match="step 5 is already the latest checkpoint"):
        ckpt.save(5, model, optimizer, Position())


def test_a_complete_checkpoint_that_latest_never_named_is_replaced(tmp_path: Path) -> None:
    """A save killed between its rename and ``latest``: the job resumes the older one and
    saves that step again."""
    ckpt = saved(tmp_path)
    shutil.copytree(tmp_path / "step-00000005", tmp_path / "step-00000010")  # an orphan, not the latest
    model, optimizer = build("adam", seed=3)
    ckpt.save(10, model, optimizer, Position(epoch=1))
    fresh, fresh_optimizer = build("adam", seed=2)
    assert ckpt.resume(fresh, fresh_optimizer) == Position(step=10, epoch=1)
    assert_same(fresh.state_dict(), model.state_dict())


# ------------------------------------------------------------ item 2: the global position


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), before=st.integers(1, 4), after=st.integers(1, 4), steps=st.integers(0, 20),
       batch=st.integers(1, 5))
def test_a_resume_at_another_world_size_trains_every_batch_once(n: int, before: int, after: int, steps: int,
                                                                batch: int) -> None:
    """Saved after ``steps`` steps at world size ``before``, resumed at ``after``: the global
    batches trained are exactly those of one pass, each once, in the order of the splits."""
    steps = min(steps, n // before)
    first = [g for r in range(before) for g in split_batches(0, n, r, before)[:steps]]
    position = Position(step=steps, samples=steps * before * batch, seed=7)
    start = position.first_batch(batch, seed=7)
    rest = [g for r in range(after) for g in split_batches(start, n, r, after)]
    trained = sorted(first + rest)
    assert trained == list(range(len(trained)))  # no batch twice, none skipped before the end
    assert n - len(trained) < after  # only the tail that does not split evenly is left out
    assert {len(split_batches(start, n, r, after)) for r in range(after)} == {len(rest) // after}


def test_what_cannot_be_re_split_is_refused() -> None:
    position = Position(step=3, samples=6 * 1024, seed=7)
    assert position.first_batch(512, seed=7) == 12
    with pytest.raises(CheckpointError, match="saved with data order seed 7, this job uses 8: resume with seed 7"):
        position.first_batch(1024, seed=8)
    with pytest.raises(CheckpointError, match="not a whole number of batches of 1000: resume with a batch size"):
        position.first_batch(1000, seed=7)
