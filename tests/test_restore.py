"""restore(): checkpoints into live objects, strictly or for fine-tuning, with a report of what happened."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cairn


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _assert_same_state(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    else:
        assert a == b


def test_full_restore_gives_back_every_object(tmp_path: Path) -> None:
    model, opt, sched = _trained(0)
    ema = torch.arange(5.0)
    state = {"model": model, "opt": opt, "sched": sched, "epoch": 7, "ema": ema, "hist": [0.5, 0.25]}
    cairn.save(tmp_path / "s", state, step=3)

    m2, o2, s2 = _trained(1)
    ema2 = torch.zeros(5)
    live = {"model": m2, "opt": o2, "sched": s2, "epoch": 0, "ema": ema2, "hist": []}
    report = cairn.restore(tmp_path / "s", live)
    assert report.ok and report.checkpoint == "step-3" and report.step == 3
    assert set(report.loaded) >= {"model.0.weight", "model.1.running_mean", "opt", "sched", "epoch", "ema"}
    _assert_same_state(model.state_dict(), m2.state_dict())
    _assert_same_state(opt.state_dict(), o2.state_dict())
    _assert_same_state(sched.state_dict(), s2.state_dict())
    assert live["epoch"] == 7 and live["hist"] == [0.5, 0.25]
    assert live["ema"] is ema2 and torch.equal(ema2, ema)  # tensors are filled in place
    # the restored optimizer continues exactly like the original
    x = torch.randn(16, 4)
    for mm, oo in ((model, opt), (m2, o2)):
        oo.zero_grad()
        mm(x).pow(2).mean().backward()
        oo.step()
    _assert_same_state(model.state_dict(), m2.state_dict())


def test_strict_failure_lists_everything_and_changes_nothing(tmp_path: Path) -> None:
    model, _, _ = _trained(0)
    cairn.save(tmp_path / "s", {"model": model, "epoch": 1}, step=1)
    other = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    live = {"model": other, "epoch": 0, "extra": 1}
    with pytest.raises(cairn.RestoreError) as info:
        cairn.restore(tmp_path / "s", live)
    msg = str(info.value)
    assert "model.3.weight" in msg and "model.4.weight" in msg and "extra" in msg and "strict=False" in msg
    _assert_same_state(before, other.state_dict())
    assert live["epoch"] == 0


def test_non_strict_loads_a_backbone_into_a_new_head(tmp_path: Path) -> None:
    model, _, _ = _trained(0)
    cairn.save(tmp_path / "s", {"model": model}, step=1)
    torch.manual_seed(5)
    new = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    head_before = new[3].weight.detach().clone()
    report = cairn.restore(tmp_path / "s", {"model": new}, strict=False)
    assert not report.ok
    assert [m.key for m in report.mismatched] == ["model.3.weight", "model.3.bias"]
    assert "[10, 8]" in report.mismatched[0].expected and "[3, 8]" in report.mismatched[0].saved
    assert torch.equal(new[0].weight, model[0].weight)
    assert torch.equal(new[1].running_var, model[1].running_var)
    assert torch.equal(new[3].weight, head_before)


def test_rename_and_include_exclude(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = nn.ModuleDict({"backbone": nn.Linear(3, 3), "head": nn.Linear(3, 1)})
    cairn.save(tmp_path / "s", {"model": saved}, step=1)
    live = nn.ModuleDict({"encoder": nn.Linear(3, 3), "classifier": nn.Linear(3, 7)})
    report = cairn.restore(
        tmp_path / "s",
        {"model": live},
        rename={"model.backbone": "model.encoder"},
        exclude=["model.classifier", "model.head"],
    )
    assert report.ok, report.summary()
    assert torch.equal(live["encoder"].weight, saved["backbone"].weight)
    assert report.skipped == ["model.classifier.weight", "model.classifier.bias"]
    report = cairn.restore(
        tmp_path / "s", {"model": live}, rename={"model.backbone": "model.encoder"}, strict=False
    )
    assert report.unexpected == ["model.head.weight", "model.head.bias"]
    only = nn.ModuleDict({"backbone": nn.Linear(3, 3), "head": nn.Linear(3, 1)})
    report = cairn.restore(tmp_path / "s", {"model": only}, include="model.head")
    assert report.loaded == ["model.head.weight", "model.head.bias"]
    assert torch.equal(only["head"].weight, saved["head"].weight)
    assert not torch.equal(only["backbone"].weight, saved["backbone"].weight)


def test_rename_with_a_function(tmp_path: Path) -> None:
    saved = nn.Linear(2, 2)
    cairn.save(tmp_path / "s", {"net": saved}, step=1)
    live = nn.Linear(2, 2)
    report = cairn.restore(
        tmp_path / "s", {"model": live}, rename=lambda k: k.replace("net", "model", 1) if k else k
    )
    assert report.ok and torch.equal(live.weight, saved.weight)


def test_restore_a_bare_module_and_numpy(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    cairn.save(tmp_path / "m", model, step=0)
    live = nn.Linear(3, 2)
    assert cairn.restore(tmp_path / "m", live).ok
    assert torch.equal(live.weight, model.weight)
    arr = np.arange(6.0)
    cairn.save(tmp_path / "n", {"a": arr, "t": (1, 2)}, step=0)
    target = np.zeros(6)
    report = cairn.restore(tmp_path / "n", {"a": target, "t": (0, 0)})
    assert np.array_equal(target, arr)
    assert report.ok


def test_mismatched_plain_tensor_is_reported(tmp_path: Path) -> None:
    cairn.save(tmp_path / "s", {"w": torch.ones(3)}, step=0)
    live = {"w": torch.zeros(4)}
    with pytest.raises(cairn.RestoreError, match="mismatched w"):
        cairn.restore(tmp_path / "s", live)
    report = cairn.restore(tmp_path / "s", live, strict=False)
    assert report.mismatched[0].key == "w" and torch.equal(live["w"], torch.zeros(4))


def test_missing_objects_are_reported(tmp_path: Path) -> None:
    cairn.save(tmp_path / "s", {"model": nn.Linear(2, 2)}, step=0)
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    report = cairn.restore(tmp_path / "s", {"model": nn.Linear(2, 2), "opt": opt}, strict=False)
    assert report.missing == ["opt"]
    with pytest.raises(cairn.RestoreError, match="missing from the checkpoint"):
        cairn.restore(tmp_path / "s", {"model": nn.Linear(2, 2), "opt": opt})


def test_restore_a_named_checkpoint(tmp_path: Path) -> None:
    for step in range(3):
        cairn.save(tmp_path / "s", {"epoch": step}, step=step)
    live = {"epoch": -1}
    assert cairn.restore(tmp_path / "s", live, "step-1").step == 1
    assert live["epoch"] == 1


def test_restoring_some_of_the_saved_objects_is_not_an_error(tmp_path: Path) -> None:
    model, opt, _ = _trained(0)
    cairn.save(tmp_path / "s", {"model": model, "optim": opt, "epoch": 3, "note": "warmup"}, step=300)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    report = cairn.restore(tmp_path / "s", {"model": fresh})  # strict: only what was passed must fit
    assert report.ok and report.unexpected == []
    assert report.unused[:1] == ["optim.state.0.step"] and report.unused[-2:] == ["epoch", "note"]
    _assert_same_state(model.state_dict(), fresh.state_dict())
    bigger = {"model": nn.Sequential(nn.Linear(4, 8))}  # inside what was passed, extra keys do count
    with pytest.raises(cairn.RestoreError, match=r"unexpected in the checkpoint .*model\.1\.weight"):
        cairn.restore(tmp_path / "s", bigger)
