"""Exact resumption: RNGState, ResumableSampler, ResumableDataLoader.

The key guarantee: a run saved mid-epoch and resumed in fresh objects ends bit-identical to a run never
interrupted, and (the reason these helpers exist) the same experiment with a plain DataLoader does not.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, get_worker_info

import cairn
from cairn._resume import ResumableDataLoader, ResumableSampler, RNGState, resumable_loader
from cairn.errors import RestoreError

# Python >= 3.12 warns when forking a multi-threaded process (torch's thread pools); workers still work.
_FORK_OK = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> None:
    x, y = batch
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)  # dropout: torch's global generator
    loss = loss * (1 + 0.01 * random.random()) * (1 + 0.01 * float(np.random.rand()))  # python, numpy
    loss.backward()
    opt.step()


def _assert_same_training(a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, Any]) -> None:
    for (ka, va), (kb, vb) in zip(a[0].state_dict().items(), b[0].state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        assert st.keys() == sb["state"][i].keys()
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


def _differs(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return any(not torch.equal(x, y) for x, y in pairs)


EPOCHS = 3


def _run_uninterrupted(**loader_kwargs: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    _seed_all(0)
    model, opt = _model()
    loader = resumable_loader(_dataset(), seed=7, **loader_kwargs)
    for _ in range(EPOCHS):
        for batch in loader:
            _step(model, opt, batch)
    return model, opt


# ------------------------------------------------------------------------------------- the guarantee


@pytest.mark.parametrize(
    ("batch_size", "drop_last", "stop"),
    [
        (4, False, (1, 3)),  # mid-epoch
        (4, False, (0, 0)),  # after the very first batch
        (4, False, (1, 9)),  # after the last batch of an epoch
        (6, False, (1, 6)),  # after the short last batch
        (6, True, (1, 2)),  # the short last batch is dropped
        (6, True, (0, 5)),  # after the last full batch: the epoch is over
    ],
)
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(
    tmp_path: Path, batch_size: int, drop_last: bool, stop: tuple[int, int]
) -> None:
    kwargs = {"batch_size": batch_size, "drop_last": drop_last, "shuffle": True}
    reference = _run_uninterrupted(**kwargs)

    # run B: train until `stop` (epoch, batch), save, and throw everything away
    _seed_all(0)
    model, opt = _model()
    loader = resumable_loader(_dataset(), seed=7, **kwargs)
    step = 0
    for epoch in range(EPOCHS):
        for i, batch in enumerate(loader):
            _step(model, opt, batch)
            step += 1
            if (epoch, i) == stop:
                break
        else:
            continue
        break
    state = {"model": model, "optim": opt, "rng": RNGState(), "data": loader, "step": step}
    cairn.save(tmp_path / "ck", state, step=step)
    del model, opt, loader, state

    # fresh objects, every global generator scrambled: only the checkpoint can bring the run back
    _seed_all(999)
    model, opt = _model()
    loader = resumable_loader(_dataset(), seed=7, **kwargs)
    state = {"model": model, "optim": opt, "rng": RNGState(), "data": loader, "step": 0}
    report = cairn.restore(tmp_path / "ck", state)
    assert report.ok and state["step"] == step
    for _ in range(loader.epoch, EPOCHS):
        for batch in loader:
            _step(model, opt, batch)
    _assert_same_training(reference, (model, opt))


def test_the_trap_a_plain_dataloader_resumed_by_skipping_batches_diverges(tmp_path: Path) -> None:
    """Why the helpers exist: a plain DataLoader draws its shuffle order and its workers' base seed from
    torch's global generator at every iter(), so a resumed run draws where the original never did."""

    def plain() -> DataLoader[Any]:
        return DataLoader(_dataset(), batch_size=4, shuffle=True)

    _seed_all(0)
    ref_model, ref_opt = _model()
    loader = plain()
    for _ in range(EPOCHS):
        for batch in loader:
            _step(ref_model, ref_opt, batch)

    _seed_all(0)
    model, opt = _model()
    loader = plain()
    k = 3
    for batch in loader:  # epoch 0
        _step(model, opt, batch)
    for i, batch in enumerate(loader):  # epoch 1, until batch k
        _step(model, opt, batch)
        if i == k:
            break
    cairn.save(tmp_path / "ck", {"model": model, "optim": opt, "rng": RNGState()})

    _seed_all(999)
    model, opt = _model()
    loader = plain()
    cairn.restore(tmp_path / "ck", {"model": model, "optim": opt, "rng": RNGState()})
    for i, batch in enumerate(loader):  # the naive resume: skip the k + 1 batches already seen
        if i > k:
            _step(model, opt, batch)
    for batch in loader:
        _step(model, opt, batch)
    assert _differs(ref_model, model)


def test_iterating_never_draws_from_the_global_generator() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = resumable_loader(_dataset(), batch_size=8, shuffle=True, seed=1)
    for _ in range(2):
        for _batch in loader:
            pass
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)
    iter(DataLoader(_dataset(), batch_size=8, shuffle=True))  # the trap, for contrast
    assert not torch.equal(torch.get_rng_state(), before)


# -------------------------------------------------------------------------------------------- RNGState


def _draws() -> tuple[Any, ...]:
    """Draws from every global generator, gaussians first (Python and numpy cache their second one)."""
    return (random.gauss(0, 1), float(np.random.standard_normal()), random.random(), torch.rand(3))


def _same_draws(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    _seed_all(5)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    rng = RNGState()
    cairn.save(tmp_path / "ck", {"rng": rng})
    expected = _draws()
    _seed_all(999)
    cairn.restore(tmp_path / "ck", {"rng": RNGState()})
    assert _same_draws(_draws(), expected)

    state = rng.state_dict()
    assert set(state) == {"python", "numpy", "torch"}  # no CUDA or MPS on this machine
    expected = _draws()
    _draws()
    rng.load_state_dict(state)
    assert _same_draws(_draws(), expected)


def test_rng_state_opt_outs() -> None:
    rng = RNGState(python=False, numpy=False)
    assert set(rng.state_dict()) == {"torch"}
    full = RNGState().state_dict()
    expected = _draws()
    py = random.getstate()
    rng.load_state_dict(full)  # the saved python/numpy states are ignored: opted out
    assert random.getstate() == py
    assert torch.equal(torch.rand(3), expected[3])
    assert not any(RNGState(python=False, numpy=False, torch=False).state_dict())


def test_a_live_source_absent_from_the_checkpoint_warns_once() -> None:
    saved = RNGState(python=False, numpy=False).state_dict()
    with pytest.warns(RuntimeWarning, match=r"no state for python, numpy") as caught:
        RNGState().load_state_dict(saved)
    assert len(caught) == 1


def test_extra_generators_by_name(tmp_path: Path) -> None:
    gens: dict[str, Any] = {
        "loader": torch.Generator().manual_seed(1),
        "aug": np.random.default_rng(2),
        "legacy": np.random.RandomState(3),
        "py": random.Random(4),
    }

    def draw() -> tuple[Any, ...]:
        return (
            torch.rand(2, generator=gens["loader"]).tolist(),
            gens["aug"].random(),
            gens["legacy"].rand(),
            gens["py"].random(),
        )

    rng = RNGState(generators=gens)
    cairn.save(tmp_path / "ck", {"rng": rng})
    expected = draw()
    draw()
    cairn.restore(tmp_path / "ck", {"rng": rng})
    assert draw() == expected

    saved = rng.state_dict()
    with pytest.raises(RestoreError, match=r"generator 'aug'.*RNGState\(generators="):
        RNGState(generators={"loader": gens["loader"]}).load_state_dict(saved)
    with pytest.warns(RuntimeWarning, match=r"generator 'new'"):
        RNGState(generators={**gens, "new": torch.Generator()}).load_state_dict(saved)
    with pytest.raises(RestoreError, match=r"generator 'loader'"):  # a numpy state for a torch generator
        RNGState(generators={"loader": torch.Generator()}).load_state_dict(
            {**saved, "generators": {"loader": saved["generators"]["aug"]}}
        )
    with pytest.raises(TypeError, match="generator 'x'"):
        RNGState(generators={"x": object()})  # type: ignore[dict-item]


def test_malformed_states_are_refused_and_change_nothing() -> None:
    good = RNGState().state_dict()
    py, cpu = random.getstate(), torch.get_rng_state()
    bad_states: list[Any] = [
        "not a dict",
        {**good, "jax": 1},
        {**good, "torch": torch.zeros(5056, dtype=torch.int64)},
        {**good, "torch": torch.zeros(7, dtype=torch.uint8)},
        {**good, "python": (3, (1, 2), None)},
        {**good, "numpy": {"state": 1}},
    ]
    for bad in bad_states:
        with pytest.raises(RestoreError, match="RNGState"):
            RNGState().load_state_dict(bad)
        assert random.getstate() == py and torch.equal(torch.get_rng_state(), cpu)


class _FakeCuda:
    """Pretend ``n`` CUDA devices, through monkeypatch of the four functions RNGState uses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
        self.n = n
        self.states = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(n)]
        self.set_calls: list[list[torch.Tensor]] = []
        self.fail = False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: self.n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.n)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self._set)

    def _set(self, states: list[torch.Tensor]) -> None:
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access")
        self.set_calls.append(list(states))
        for i, s in enumerate(states):
            self.states[i] = s.clone()


def test_cuda_generators_are_saved_and_restored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cuda = _FakeCuda(monkeypatch, 4)
    cairn.save(tmp_path / "ck", {"rng": RNGState()})
    assert len(RNGState().state_dict()["cuda"]) == 4
    saved = [s.clone() for s in cuda.states]
    cuda.states = [torch.zeros(16, dtype=torch.uint8) for _ in range(4)]
    cairn.restore(tmp_path / "ck", {"rng": RNGState()})
    assert len(cuda.set_calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(cuda.states, saved, strict=True))


def test_fewer_cuda_devices_than_saved_is_a_loud_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cuda = _FakeCuda(monkeypatch, 4)
    cairn.save(tmp_path / "ck", {"rng": RNGState()})
    cuda.n = 2
    py = random.getstate()
    with pytest.raises(
        RestoreError, match=r"(?s)4 CUDA devices but only 2 are visible.*RNGState\(cuda=False\).*Nothing"
    ):
        cairn.restore(tmp_path / "ck", {"rng": RNGState()})
    assert cuda.set_calls == [] and random.getstate() == py
    cuda.n = 0
    with pytest.raises(RestoreError, match="CUDA is not available here"):
        cairn.restore(tmp_path / "ck", {"rng": RNGState()})
    cairn.restore(tmp_path / "ck", {"rng": RNGState(cuda=False)})  # opting out is how to proceed
    assert cuda.set_calls == []


def test_more_cuda_devices_than_saved_or_none_saved_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(monkeypatch, 2)
    two = RNGState().state_dict()
    cuda.n = 4
    cuda.states += [torch.zeros(16, dtype=torch.uint8)] * 2
    with pytest.warns(RuntimeWarning, match=r"cuda devices 2\.\.3"):
        RNGState().load_state_dict(two)
    assert len(cuda.set_calls[-1]) == 2
    without = RNGState(cuda=False).state_dict()
    with pytest.warns(RuntimeWarning, match=r"cuda \(4 devices\)"):
        RNGState().load_state_dict(without)


def test_a_failure_half_way_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(monkeypatch, 1)
    saved = RNGState().state_dict()
    _draws()
    py, cpu = random.getstate(), torch.get_rng_state()
    cuda.fail = True
    with pytest.raises(RestoreError, match="illegal memory access"):
        RNGState().load_state_dict(saved)
    assert random.getstate() == py and torch.equal(torch.get_rng_state(), cpu)


def test_mps_state_without_mps_is_a_loud_error(monkeypatch: pytest.MonkeyPatch) -> None:
    mps_state = torch.arange(8, dtype=torch.uint8)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: mps_state.clone())
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    saved = RNGState().state_dict()
    assert torch.equal(saved["mps"], mps_state)
    RNGState().load_state_dict(saved)
    assert torch.equal(restored[0], mps_state)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RestoreError, match=r"MPS is not available.*RNGState\(mps=False\)"):
        RNGState().load_state_dict(saved)
    RNGState(mps=False).load_state_dict(saved)


# ------------------------------------------------------------------------------------ ResumableSampler


def test_sampler_order_is_a_deterministic_function_of_seed_and_epoch() -> None:
    before = torch.get_rng_state()
    a, b = ResumableSampler(10, seed=3), ResumableSampler(range(10), seed=3)
    orders = [list(a) for _ in range(3)]
    assert orders == [list(b) for _ in range(3)]
    assert orders == [a.epoch_order(e) for e in range(3)]
    assert all(sorted(o) == list(range(10)) for o in orders) and orders[0] != orders[1]
    g = torch.Generator().manual_seed(3 + 2)
    assert orders[2] == torch.randperm(10, generator=g).tolist()
    assert list(ResumableSampler(10, seed=4)) != orders[0]
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    assert len(a) == 10 and (a.epoch, a.position) == (3, 0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("position", range(11))
def test_sampler_resumes_at_every_position(position: int) -> None:
    a = ResumableSampler(10, seed=1)
    it = iter(a)
    for _ in range(position):
        next(it)
    state = a.state_dict()
    assert state == {
        "epoch": 1 if position == 10 else 0,
        "position": 0 if position == 10 else position,
        "seed": 1,
        "shuffle": True,
        "size": 10,
    }
    b = ResumableSampler(10, seed=1)
    b.load_state_dict(state)
    expected = a.epoch_order(0)[position:] if position < 10 else a.epoch_order(1)
    assert list(b) == expected
    epoch = b.epoch
    assert list(b) == b.epoch_order(epoch)  # then the next full epoch
    assert len(b) == 10  # always the full epoch, even when resumed part-way


def test_sampler_set_epoch_and_advance() -> None:
    s = ResumableSampler(6, seed=0)
    s.set_epoch(4)
    assert (s.epoch, s.position) == (4, 0) and list(s) == s.epoch_order(4)
    s.advance(2)
    s.set_epoch(5)  # the current epoch: keeps the position (a DistributedSampler-style loop resumes)
    assert (s.epoch, s.position) == (5, 2) and list(s) == s.epoch_order(5)[2:]
    s.set_epoch(2)
    assert (s.epoch, s.position) == (2, 0)
    s.advance(6)
    assert (s.epoch, s.position) == (3, 0)
    with pytest.raises(ValueError, match="only 6 samples"):
        s.advance(7)
    with pytest.raises(ValueError):
        s.advance(-1)
    with pytest.raises(ValueError):
        s.set_epoch(-1)
    it = iter(s)
    next(it)
    s.advance(1)
    with pytest.raises(RuntimeError, match="stale"):
        next(it)


def test_sampler_validates_the_saved_state() -> None:
    s = ResumableSampler(10, seed=1)
    s.advance(3)
    state = s.state_dict()
    for live, field in [
        (ResumableSampler(11, seed=1), "size: saved 10, live 11"),
        (ResumableSampler(10, seed=2), "seed: saved 1, live 2"),
        (ResumableSampler(10, seed=1, shuffle=False), "shuffle: saved True, live False"),
    ]:
        with pytest.raises(RestoreError, match=field):
            live.load_state_dict(state)
        assert (live.epoch, live.position) == (0, 0)
    with pytest.raises(RestoreError, match="keys"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(RestoreError, match="out of range"):
        s.load_state_dict({**state, "position": 11})
    with pytest.raises(RestoreError, match="not an int"):
        s.load_state_dict({**state, "epoch": "1"})
    with pytest.raises(TypeError):
        ResumableSampler(True)
    with pytest.raises(ValueError):
        ResumableSampler(-1)


# --------------------------------------------------------------------------------- ResumableDataLoader


def _indices(batches: list[torch.Tensor]) -> list[list[int]]:
    return [b.tolist() for b in batches]


@pytest.mark.parametrize(("batch_size", "drop_last"), [(3, False), (3, True), (5, False), (None, False)])
def test_loader_resumes_at_every_batch(batch_size: int | None, drop_last: bool) -> None:
    ds = TensorDataset(torch.arange(10))

    def make() -> ResumableDataLoader:
        return resumable_loader(ds, batch_size=batch_size, drop_last=drop_last, seed=2)

    ref = make()
    epochs = [_indices([b[0] for b in ref]) for _ in range(3)]
    assert len(epochs[0]) == len(ref) == {3: 3 if drop_last else 4, 5: 2, None: 10}[batch_size]
    for e in range(2):
        for i in range(len(epochs[e])):
            a = make()
            for _ in range(e):
                list(a)
            it = iter(a)
            for _ in range(i + 1):
                next(it)
            b = make()
            b.load_state_dict(a.state_dict())
            if i + 1 < len(epochs[e]):
                assert b.epoch == e and _indices([x[0] for x in b]) == epochs[e][i + 1 :]
            assert b.epoch == e + 1 and _indices([x[0] for x in b]) == epochs[e + 1]
            list(it)
            list(a)
            assert torch.equal(b.generator.get_state(), a.generator.get_state())  # the same draws


def test_loader_state_holds_the_generator_at_the_epoch_start() -> None:
    ds = TensorDataset(torch.arange(8))
    a = resumable_loader(ds, batch_size=2, seed=0)
    start = a.generator.get_state()
    it = iter(a)
    next(it)
    assert not torch.equal(a.generator.get_state(), start)  # iter() drew the workers' base seed
    assert torch.equal(a.state_dict()["generator"], start)
    list(it)
    assert a.epoch == 1 and torch.equal(a.state_dict()["generator"], a.generator.get_state())
    b = resumable_loader(ds, batch_size=2, seed=0)
    it = iter(a)
    next(it)
    b.load_state_dict(a.state_dict())
    list(b)
    assert torch.equal(b.generator.get_state(), a.generator.get_state())  # the same draws as run A


def test_loader_arguments_and_validation(tmp_path: Path) -> None:
    ds = TensorDataset(torch.arange(10))
    for bad in ("sampler", "batch_sampler", "generator"):
        with pytest.raises(ValueError, match=f"custom '{bad}'"):
            resumable_loader(ds, **{bad: None})

    class Stream(IterableDataset[int]):
        def __iter__(self) -> Any:
            return iter(range(3))

    with pytest.raises(ValueError, match="IterableDataset"):
        resumable_loader(Stream())
    loader = resumable_loader(ds, batch_size=4, shuffle=False)
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, ResumableSampler)
    assert len(loader) == 3 and _indices([b[0] for b in loader]) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    cairn.save(tmp_path / "ck", {"data": loader})
    other = resumable_loader(ds, batch_size=4, shuffle=True)
    with pytest.raises(RestoreError, match="shuffle: saved False, live True"):
        cairn.restore(tmp_path / "ck", {"data": other})
    assert other.state_dict()["sampler"]["epoch"] == 0
    with pytest.raises(RestoreError, match="generator"):
        other.load_state_dict({**other.state_dict(), "generator": torch.zeros(3, dtype=torch.uint8)})
    it = iter(loader)
    next(it)
    iter(loader)
    with pytest.raises(RuntimeError, match="stale"):
        next(it)


class _Probe(Dataset[torch.Tensor]):
    """Returns (index, the worker's base seed, a draw from the worker's global generator)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        info = get_worker_info()
        base = -1 if info is None else info.seed - info.id
        return torch.tensor([i, base, int(torch.randint(0, 2**30, ()))])


@_FORK_OK
@pytest.mark.parametrize("persistent", [False, True])
def test_loader_with_workers_resumes_the_same_batches(tmp_path: Path, persistent: bool) -> None:
    def make() -> ResumableDataLoader:
        return resumable_loader(_Probe(), batch_size=2, seed=3, num_workers=2, persistent_workers=persistent)

    ref = make()
    epochs = [list(ref) for _ in range(2)]
    bases = {int(b[0, 1]) for b in epochs[0]} | {int(b[0, 1]) for b in epochs[1]}
    assert len(bases) == (1 if persistent else 2) and -1 not in bases

    a = make()
    it = iter(a)
    for _ in range(2):
        next(it)  # the workers have prefetched more: only these two count
    assert a.state_dict()["sampler"]["position"] == 4
    cairn.save(tmp_path / "ck", {"data": a})
    del it, a
    b = make()
    cairn.restore(tmp_path / "ck", {"data": b})
    rest = list(b)
    nxt = list(b)
    # the same indices, from workers seeded with the same base seed as in the uninterrupted run
    assert [r[:, :2].tolist() for r in rest] == [r[:, :2].tolist() for r in epochs[0][2:]]
    assert [r[:, :2].tolist() for r in nxt] == [r[:, :2].tolist() for r in epochs[1]]
    if not persistent:  # fresh workers every epoch: after the resumed epoch even worker draws match
        assert [r.tolist() for r in nxt] == [r.tolist() for r in epochs[1]]


# ------------------------------------------------------------------------------ any stateful loader


class _FakeStatefulLoader:
    """Stands in for torchdata's StatefulDataLoader: anything with state_dict()/load_state_dict()."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {
            "_num_yielded": 0,
            "_sampler_iter_state": {"samples_yielded": 0, "generator": torch.Generator().get_state()},
            "_iterator_finished": False,
            "worker_states": {0: {"offset": (0, 0)}, 1: None},
        }

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def test_any_stateful_loader_round_trips(tmp_path: Path) -> None:
    loader = _FakeStatefulLoader()
    loader.state["_num_yielded"] = 17
    loader.state["_sampler_iter_state"]["samples_yielded"] = 68
    loader.state["worker_states"][0]["offset"] = (3, 2**70)
    cairn.save(tmp_path / "ck", {"data": loader})
    fresh = _FakeStatefulLoader()
    cairn.restore(tmp_path / "ck", {"data": fresh})
    got, want = fresh.state, loader.state
    assert got["_num_yielded"] == 17 and got["_iterator_finished"] is False
    assert got["_sampler_iter_state"]["samples_yielded"] == 68
    assert torch.equal(got["_sampler_iter_state"]["generator"], want["_sampler_iter_state"]["generator"])
    assert got["worker_states"] == {0: {"offset": (3, 2**70)}, 1: None}  # int keys and tuples kept
