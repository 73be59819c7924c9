"""Exact resumption: random generators and data order that a checkpoint saves and restores.

A run resumed from a checkpoint continues bit-identically to one never interrupted only if everything
random continues exactly where it stopped: the global generators (dropout, augmentation) and the order in
which the data comes. Put these objects in the state you save::

    loader = cairn.resumable_loader(dataset, batch_size=32, shuffle=True, seed=0)
    state = {"model": model, "optim": opt, "rng": cairn.RNGState(), "data": loader}
    cairn.restore("ckpts", state)                     # (when resuming)
    for epoch in range(loader.epoch, num_epochs):
        for batch in loader:                          # a resumed epoch continues mid-way
            ...
            cairn.save("ckpts", state, step=step)

* :class:`RNGState` captures Python's ``random``, numpy's global generator, torch's CPU generator, every
  CUDA generator, MPS, and any named generators you pass. Restoring is loud: a saved generator that cannot
  be restored raises :class:`~cairn.RestoreError`, a live one the checkpoint lacks warns.
* :class:`ResumableSampler` gives epoch ``e`` the permutation of a generator seeded ``seed + e`` and
  remembers how many indices of the current epoch were consumed.
* :class:`ResumableDataLoader` (made by :func:`resumable_loader`) counts the batches that reached your loop
  (not those prefetched by workers) and has its own generator, so iterating it never draws from torch's
  global generator. A plain ``DataLoader`` draws from it at every ``iter()`` (and ``shuffle=True`` once
  more), so a run resumed mid-epoch makes draws the uninterrupted run never made and diverges.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from cairn.errors import RestoreError

__all__ = ["RNGState", "ResumableDataLoader", "ResumableSampler", "resumable_loader"]

_MASK64 = 2**64 - 1

Generator = torch.Generator | np.random.Generator | np.random.RandomState | random.Random
"""The kinds of generator :class:`RNGState` accepts in ``generators=``."""
_GENERATOR_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


class _Unfit(Exception):
    """A saved value that cannot be restored into a live generator (its message says why)."""


def _kind(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


# ------------------------------------------------------------------------------------ state conversions


def _python_state(rng: random.Random | None = None) -> dict[str, Any]:
    version, internal, gauss_next = (rng or random).getstate()
    # The Mersenne Twister's 624 words and its position, all below 2**32: a compact, exact array.
    return {"version": version, "state": np.array(internal, dtype=np.uint32), "gauss_next": gauss_next}


def _python_prepare(saved: Any) -> tuple[Any, ...]:
    if not isinstance(saved, Mapping) or set(saved) != {"version", "state", "gauss_next"}:
        raise _Unfit("expected a dict with keys 'version', 'state', 'gauss_next' (random.getstate())")
    version, internal, gauss = saved["version"], saved["state"], saved["gauss_next"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Unfit(f"'version' is a {type(version).__name__}, not an int")
    words = np.asarray(internal.numpy() if isinstance(internal, torch.Tensor) else internal)
    if words.ndim != 1 or words.dtype.kind not in "ui" or len(words) != 625:
        raise _Unfit(f"'state' should hold 625 integers, it has shape {list(words.shape)} {words.dtype}")
    if gauss is not None and (isinstance(gauss, bool) or not isinstance(gauss, float | int)):
        raise _Unfit(f"'gauss_next' is a {type(gauss).__name__}, not a float or None")
    return (version, tuple(int(w) for w in words), None if gauss is None else float(gauss))


def _numpy_prepare(saved: Any) -> dict[str, Any]:
    if not isinstance(saved, Mapping) or not isinstance(saved.get("bit_generator"), str):
        raise _Unfit("expected a numpy bit generator state dict (with a 'bit_generator' name)")
    out = dict(saved)
    if isinstance(out.get("state"), Mapping):
        out["state"] = {
            k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in dict(out["state"]).items()
        }
    return out


def _byte_tensor(saved: Any, numel: int | None = None) -> torch.Tensor:
    if isinstance(saved, np.ndarray):
        saved = torch.from_numpy(np.array(saved))
    if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8 or saved.ndim != 1:
        what = _kind(saved)
        if isinstance(saved, torch.Tensor):
            what = f"{saved.dtype} tensor of shape {list(saved.shape)}"
        raise _Unfit(f"expected a 1-D uint8 tensor (a generator's get_state()), got {what}")
    if numel is not None and saved.numel() != numel:
        raise _Unfit(f"the saved state has {saved.numel()} bytes, this generator's has {numel}")
    return saved.detach().to("cpu").contiguous().clone()


def _capture_generator(g: Generator) -> Any:
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, np.random.Generator):
        return g.bit_generator.state
    if isinstance(g, np.random.RandomState):
        return g.get_state(legacy=False)
    return _python_state(g)


def _prepare_generator(g: Generator, saved: Any) -> Any:
    if isinstance(g, torch.Generator):
        return _byte_tensor(saved, g.get_state().numel())
    if isinstance(g, np.random.Generator | np.random.RandomState):
        return _numpy_prepare(saved)
    return _python_prepare(saved)


def _apply_generator(g: Generator, value: Any) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(value)
    elif isinstance(g, np.random.Generator):
        g.bit_generator.state = value
    elif isinstance(g, np.random.RandomState):
        g.set_state(value)
    else:
        g.setstate(value)


def _mps_available() -> bool:
    return bool(torch.backends.mps.is_available())


# ---------------------------------------------------------------------------------------------- RNGState


class RNGState:
    """The state of every random number generator a training run draws from, saved like a module.

    Put ``cairn.RNGState()`` in the state you save and restore::

        state = {"model": model, "optim": opt, "rng": cairn.RNGState()}

    ``state_dict()`` captures the generators *at that moment* and ``load_state_dict()`` sets them, so
    the object itself holds nothing and one instance serves every save and restore. Sources:

    * ``python``: the global ``random`` generator;
    * ``numpy``: numpy's legacy global generator (``np.random.seed``/``np.random.rand``);
    * ``torch``: torch's CPU generator (``torch.manual_seed``, dropout on the CPU, ``torch.rand``);
    * ``cuda``: every CUDA device's default generator, when CUDA is available;
    * ``mps``: the Apple GPU generator, when MPS is available;
    * ``generators``: your own generators by name: ``torch.Generator``, ``numpy.random.Generator``,
      ``numpy.random.RandomState`` or ``random.Random``.

    Pass ``python=False`` (etc.) to neither save nor restore a source; a saved source that is opted
    out is ignored on restore.

    Restoring is loud, never a silent skip: a saved source that cannot be restored (CUDA state of 4
    devices with 2 visible, MPS state without MPS, a named generator that is not passed, a state of the
    wrong form) raises :class:`~cairn.RestoreError` listing every problem and changes nothing. A source
    live now that the checkpoint lacks (CUDA available now but not when saved, a new named generator)
    keeps its current state, and one ``RuntimeWarning`` per restore names them all.

    Not captured: generators of other libraries, the global generators inside DataLoader worker
    processes (they are re-seeded from the loader at every epoch; see :class:`ResumableDataLoader`), and
    numpy ``Generator`` objects you did not pass in ``generators``.
    """

    def __init__(
        self,
        *,
        python: bool = True,
        numpy: bool = True,
        torch: bool = True,
        cuda: bool = True,
        mps: bool = True,
        generators: Mapping[str, Generator] | None = None,
    ) -> None:
        self.python = python
        self.numpy = numpy
        self.torch = torch
        self.cuda = cuda
        self.mps = mps
        self.generators: dict[str, Generator] = dict(generators or {})
        for name, g in self.generators.items():
            if not isinstance(name, str):
                raise TypeError(f"RNGState: generator names must be str, got {name!r}")
            if not isinstance(g, _GENERATOR_TYPES):
                raise TypeError(
                    f"RNGState: generator {name!r} is a {_kind(g)}; pass a torch.Generator, "
                    "numpy.random.Generator, numpy.random.RandomState or random.Random"
                )

    def __repr__(self) -> str:
        on = [s for s in ("python", "numpy", "torch", "cuda", "mps") if getattr(self, s)]
        extra = f", generators={sorted(self.generators)}" if self.generators else ""
        return f"RNGState({', '.join(on)}{extra})"

    def state_dict(self) -> dict[str, Any]:
        """The current state of every enabled source that exists here (CUDA and MPS only if available)."""
        out: dict[str, Any] = {}
        if self.python:
            out["python"] = _python_state()
        if self.numpy:
            out["numpy"] = np.random.get_state(legacy=False)
        if self.torch:
            out["torch"] = torch.get_rng_state()
        if self.cuda and torch.cuda.is_available():
            out["cuda"] = list(torch.cuda.get_rng_state_all())
        if self.mps and _mps_available():
            out["mps"] = torch.mps.get_rng_state()
        if self.generators:
            out["generators"] = {name: _capture_generator(g) for name, g in self.generators.items()}
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Set every enabled generator to its saved state; loud about anything that does not fit.

        Raises :class:`~cairn.RestoreError` (changing nothing) when a saved source cannot be restored;
        warns (``RuntimeWarning``, once per call) when live sources are absent from the checkpoint.
        """
        if not isinstance(state_dict, Mapping):
            raise RestoreError(
                f"RNGState: expected the dict of RNGState.state_dict(), got {_kind(state_dict)}"
            )
        problems: list[str] = []
        absent: list[str] = []
        plan: list[tuple[str, Any]] = []
        known = {"python", "numpy", "torch", "cuda", "mps", "generators"}
        unknown = sorted(str(k) for k in state_dict if k not in known)
        if unknown:
            problems.append(
                f"unknown sources {unknown}: this RNGState cannot restore them (written by a newer cairn "
                "or not an RNGState's state)"
            )

        def prepare(source: str, fn: Any, *args: Any) -> None:
            try:
                plan.append((source, fn(*args)))
            except _Unfit as e:
                problems.append(f"{source}: {e}")

        for source, fn in (("python", _python_prepare), ("numpy", _numpy_prepare)):
            if getattr(self, source):
                if source in state_dict:
                    prepare(source, fn, state_dict[source])
                else:
                    absent.append(source)
        if self.torch:
            if "torch" in state_dict:
                prepare("torch", _byte_tensor, state_dict["torch"], torch.get_rng_state().numel())
            else:
                absent.append("torch")
        if self.cuda:
            self._plan_cuda(state_dict, problems, absent, plan)
        if self.mps:
            live = _mps_available()
            if "mps" in state_dict:
                if live:
                    prepare("mps", _byte_tensor, state_dict["mps"])
                else:
                    problems.append(
                        "mps: the checkpoint holds the MPS generator's state but MPS is not available here; "
                        "resume on a machine with MPS, or restore with RNGState(mps=False) to skip it"
                    )
            elif live:
                absent.append("mps")
        self._plan_generators(state_dict.get("generators"), problems, absent, plan)

        if problems:
            raise RestoreError(
                "RNGState: cannot restore the saved random state:\n  - "
                + "\n  - ".join(problems)
                + "\nNothing was changed. A resumed run whose generators were not restored does not continue "
                "the saved run's random streams."
            )
        if absent:
            warnings.warn(
                f"RNGState: the checkpoint holds no state for {', '.join(absent)}; "
                + ("it keeps" if len(absent) == 1 else "they keep")
                + " its current state, so the resumed run's random numbers there differ from the saved "
                "run's. Opt out (e.g. RNGState(cuda=False)) to say this is intended.",
                RuntimeWarning,
                stacklevel=2,
            )
        snapshot = self._capture_plan(plan)
        try:
            self._apply(plan)
        except Exception as e:
            with contextlib.suppress(Exception):
                self._apply(snapshot)  # undo what was set
            raise RestoreError(f"RNGState: setting the saved random state failed: {e}") from e

    def _plan_cuda(
        self,
        state_dict: Mapping[str, Any],
        problems: list[str],
        absent: list[str],
        plan: list[tuple[str, Any]],
    ) -> None:
        cuda = torch.cuda
        live = int(cuda.device_count()) if cuda.is_available() else 0
        if "cuda" not in state_dict:
            if live:
                absent.append(f"cuda ({live} device{'s' if live > 1 else ''})")
            return
        saved = state_dict["cuda"]
        if not isinstance(saved, list | tuple):
            problems.append(f"cuda: expected a list of per-device states, got {_kind(saved)}")
            return
        states = []
        for i, s in enumerate(saved):
            try:
                states.append(_byte_tensor(s))
            except _Unfit as e:
                problems.append(f"cuda device {i}: {e}")
        if len(saved) > live:
            here = "CUDA is not available here" if live == 0 else f"only {live} are visible here"
            problems.append(
                f"cuda: the checkpoint holds the generator states of {len(saved)} CUDA devices but {here}; "
                f"resume with at least {len(saved)} visible devices (check CUDA_VISIBLE_DEVICES), or "
                "restore with RNGState(cuda=False) to leave the CUDA generators as they are"
            )
            return
        if len(saved) < live:
            absent.append(f"cuda devices {len(saved)}..{live - 1}")
        if states:
            plan.append(("cuda", states))

    def _plan_generators(
        self, saved: Any, problems: list[str], absent: list[str], plan: list[tuple[str, Any]]
    ) -> None:
        if saved is None:
            saved = {}
        if not isinstance(saved, Mapping):
            problems.append(f"generators: expected a dict of named states, got {_kind(saved)}")
            return
        for name in saved:
            if name not in self.generators:
                problems.append(
                    f"generator {name!r}: saved, but this RNGState has no generator of that name; pass it "
                    f"as RNGState(generators={{{name!r}: ...}})"
                )
        for name, g in self.generators.items():
            if name not in saved:
                absent.append(f"generator {name!r}")
                continue
            try:
                plan.append((f"generator:{name}", _prepare_generator(g, saved[name])))
            except _Unfit as e:
                problems.append(f"generator {name!r} ({_kind(g)}): {e}")

    def _capture_plan(self, plan: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """The current state of every source in ``plan``, to undo a restore that fails half-way."""
        out: list[tuple[str, Any]] = []
        for source, _ in plan:
            if source == "python":
                out.append((source, random.getstate()))
            elif source == "numpy":
                out.append((source, np.random.get_state(legacy=False)))
            elif source == "torch":
                out.append((source, torch.get_rng_state()))
            elif source == "cuda":
                out.append((source, list(torch.cuda.get_rng_state_all())))
            elif source == "mps":
                out.append((source, torch.mps.get_rng_state()))
            else:
                name = source.removeprefix("generator:")
                g = self.generators[name]
                state = _capture_generator(g)
                out.append((source, _python_prepare(state) if isinstance(g, random.Random) else state))
        return out

    def _apply(self, plan: list[tuple[str, Any]]) -> None:
        for source, value in plan:
            if source == "python":
                random.setstate(value)
            elif source == "numpy":
                np.random.set_state(value)
            elif source == "torch":
                torch.set_rng_state(value)
            elif source == "cuda":
                torch.cuda.set_rng_state_all(value)
            elif source == "mps":
                torch.mps.set_rng_state(value)
            else:
                _apply_generator(self.generators[source.removeprefix("generator:")], value)


# ------------------------------------------------------------------------------------- ResumableSampler


class ResumableSampler(Sampler[int]):
    """Indices of a map-style dataset in a per-epoch order that a checkpoint can resume mid-epoch.

    Epoch ``e`` visits ``range(size)`` in the order of ``torch.randperm`` with a generator seeded
    ``seed + e`` (in order when ``shuffle=False``); the global generators are never drawn from. The sampler
    tracks ``epoch`` and ``position``: how many indices of the epoch were consumed. ``iter()`` yields the
    rest of the current epoch from ``position``; once an epoch is fully consumed, ``epoch`` goes up by one
    and ``position`` back to 0.

    Who counts what is consumed: iterated by you (``for i in sampler``, or a plain single-process
    ``DataLoader``), every index handed out counts. Inside :class:`ResumableDataLoader` the loader counts
    instead, and only the samples of batches that reached your loop, so what worker processes prefetched
    is not counted. ``advance(n)`` marks ``n`` more as consumed (skips them).

    ``len(sampler)`` is always the full epoch's size (DataLoader uses it for ``len(loader)``); a resumed
    partial epoch yields fewer. ``set_epoch(e)`` starts epoch ``e`` from its beginning, as with
    ``DistributedSampler``, unless ``e`` is already the current epoch (so calling it at the top of every
    epoch keeps a resumed epoch's position).
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__()
        if isinstance(data_source, bool):
            raise TypeError("ResumableSampler: data_source must be a sized dataset or an int, not a bool")
        size = data_source if isinstance(data_source, int) else len(data_source)
        if size < 0:
            raise ValueError(f"ResumableSampler: the size must be >= 0, got {size}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"ResumableSampler: seed must be an int, got {seed!r}")
        self.size = int(size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._epoch = 0
        self._position = 0
        self._token = 0  # changes whenever (epoch, position) is moved from outside: live iterators stop
        self._managed = False  # True inside a ResumableDataLoader, which counts consumption itself
        self._cached: tuple[int, list[int]] | None = None

    @property
    def epoch(self) -> int:
        """The current epoch (0 first)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch were consumed."""
        return self._position

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(size={self.size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"epoch={self._epoch}, position={self._position})"
        )

    def epoch_order(self, epoch: int | None = None) -> list[int]:
        """The full order of indices of ``epoch`` (default: the current one)."""
        epoch = self._epoch if epoch is None else epoch
        if self._cached is not None and self._cached[0] == epoch:
            return list(self._cached[1])
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed((self.seed + epoch) & _MASK64)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        self._cached = (epoch, order)
        return list(order)

    def __iter__(self) -> Iterator[int]:
        if self.size and self._position >= self.size:
            self._next_epoch()
        rest = self.epoch_order()[self._position :]  # computed now: later moves do not change it
        if self._managed:
            return iter(rest)
        self._token += 1
        return self._counting(rest, self._token)

    def _counting(self, rest: list[int], token: int) -> Iterator[int]:
        for i in rest:
            if token != self._token:
                raise RuntimeError(
                    "ResumableSampler: this iterator is stale: the sampler was iterated again, moved "
                    "(set_epoch/advance) or restored since it started; call iter() again"
                )
            self._count(1)
            if self._position >= self.size:
                self._next_epoch()
            yield i
        if token == self._token and self.size == 0:
            self._next_epoch()

    def _count(self, n: int) -> None:
        self._position += n

    def _next_epoch(self) -> None:
        self._epoch += 1
        self._position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; a no-op when it is already the current epoch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"ResumableSampler.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch, self._position = int(epoch), 0
            self._token += 1

    def advance(self, n: int) -> None:
        """Mark ``n`` more samples of the current epoch as consumed; at the epoch's end, start the next.

        An iterator already running does not see the move (it stops with an error); call ``iter()`` again.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ResumableSampler.advance: n must be an int >= 0, got {n!r}")
        if self._position + n > self.size:
            raise ValueError(
                f"ResumableSampler.advance({n}): only {self.size - self._position} samples of epoch "
                f"{self._epoch} are left"
            )
        self._count(n)
        if self.size and self._position >= self.size:
            self._next_epoch()
        self._token += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", "seed", "shuffle", "size"}``."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "size": self.size,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a saved state; :class:`~cairn.RestoreError` unless size, seed and shuffle match."""
        epoch, position = self._check(state_dict)
        self._epoch, self._position = epoch, position
        self._token += 1

    def _check(self, state_dict: Mapping[str, Any]) -> tuple[int, int]:
        """Validate a saved state against this sampler; returns its (epoch, position)."""
        keys = {"epoch", "position", "seed", "shuffle", "size"}
        if not isinstance(state_dict, Mapping) or set(state_dict) != keys:
            got = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else _kind(state_dict)
            raise RestoreError(f"ResumableSampler: expected a state with keys {sorted(keys)}, got {got}")
        for k in ("epoch", "position", "seed", "size"):
            v = state_dict[k]
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise RestoreError(f"ResumableSampler: saved {k!r} is a {_kind(v)}, not an int")
        if not isinstance(state_dict["shuffle"], bool | np.bool_):
            raise RestoreError(f"ResumableSampler: saved 'shuffle' is a {_kind(state_dict['shuffle'])}")
        live = {"size": self.size, "seed": self.seed, "shuffle": self.shuffle}
        diffs = [f"{k}: saved {state_dict[k]!r}, live {v!r}" for k, v in live.items() if state_dict[k] != v]
        if diffs:
            raise RestoreError(
                "ResumableSampler: the checkpoint's sampler does not match this one ("
                + "; ".join(diffs)
                + "): the saved position would index a different order. Build the sampler (or loader) with "
                "the saved size, seed and shuffle, or do not restore its state (a fresh epoch order)."
            )
        epoch, position = int(state_dict["epoch"]), int(state_dict["position"])
        if epoch < 0 or not 0 <= position <= self.size:
            raise RestoreError(
                f"ResumableSampler: saved epoch {epoch} / position {position} is out of range "
                f"(size {self.size})"
            )
        return epoch, position


# ---------------------------------------------------------------------------------- ResumableDataLoader


def _loader_seed(seed: int) -> int:
    """The loader generator's seed: derived from ``seed`` but a different stream than the epoch orders."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64


class ResumableDataLoader(DataLoader[Any]):
    """A ``DataLoader`` whose position a checkpoint saves, so a resumed run sees exactly the same batches.

    It samples with a :class:`ResumableSampler` (``shuffle``, ``seed``) and has its own
    ``torch.Generator`` seeded from ``seed``: creating an iterator draws the workers' base seed from it,
    never from torch's global generator (which dropout and the like keep drawing from undisturbed).
    Every other ``DataLoader`` argument (``num_workers``, ``collate_fn``, ``pin_memory``, ...) works; a
    custom ``sampler``, ``batch_sampler`` or ``generator`` is refused.

    Iterating counts the batches handed to your loop (a batch counts as consumed once yielded; prefetched
    batches do not count) and a new ``iter()`` continues the current epoch where the last one stopped:
    even a ``next(iter(loader))`` peek consumes a batch. When the epoch's last batch is handed out the
    loader moves to the next epoch. ``len(loader)`` is the number of batches of a full epoch; a resumed
    epoch yields fewer. ``loader.epoch`` is the current epoch.

    ``state_dict()`` is the sampler's state and the loader generator's state at the start of the
    current epoch, so a resumed iterator draws the same base seed the uninterrupted run drew.

    With ``num_workers > 0``: the batches are the same, and every epoch's worker processes get the same
    seeds (base seed + worker id) as in the uninterrupted run. But a mid-epoch resume hands the remaining
    batches to freshly seeded workers in a different rotation, so randomness drawn from a worker's global
    generators in ``__getitem__`` (random augmentation) differs for the rest of that epoch; later epochs
    match again. With ``persistent_workers=True`` the workers are seeded once per run, so after a resume
    it differs for all later epochs. Randomness is reproducible across resumption only when derived from
    the sample index (e.g. ``torch.Generator().manual_seed(hash((seed, epoch, index)))``), or with
    ``num_workers=0`` where ``__getitem__`` draws from the main process's generators that
    :class:`RNGState` restores.
    """

    sampler: ResumableSampler

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        **dataloader_kwargs: Any,
    ) -> None:
        for name in ("sampler", "batch_sampler", "generator"):
            if name in dataloader_kwargs:
                raise ValueError(
                    f"ResumableDataLoader: a custom {name!r} is not supported: the loader's own sampler and "
                    "generator are what make it resumable. Use shuffle= and seed=, or a plain DataLoader "
                    "(whose position a checkpoint cannot save)"
                )
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "ResumableDataLoader: an IterableDataset has no indices to sample; make it a map-style "
                "dataset, or save the iterable's own position with state_dict()/load_state_dict()"
            )
        if not hasattr(type(dataset), "__len__"):
            raise TypeError(f"ResumableDataLoader: the dataset must have a len(); {_kind(dataset)} has none")
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
        sampler._managed = True
        self._loader_generator = torch.Generator()
        self._loader_generator.manual_seed(_loader_seed(sampler.seed))
        self._token = 0
        self._replay: tuple[int, torch.Tensor] | None = None
        """(epoch, generator state before the draw that seeded the current epoch's iterator)."""
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            generator=self._loader_generator,
            **dataloader_kwargs,
        )

    @property
    def epoch(self) -> int:
        """The current epoch (0 first); a loop ``for epoch in range(loader.epoch, n)`` resumes."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op when it is the current epoch)."""
        self.sampler.set_epoch(epoch)

    def _persistent(self) -> bool:
        return bool(self.persistent_workers and self.num_workers > 0)

    def _epoch_done(self) -> bool:
        s = self.sampler
        left = s.size - s.position
        return left <= 0 or (self.drop_last and self.batch_size is not None and left < self.batch_size)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        s = self.sampler
        if s.position > 0 and self._epoch_done():
            s._next_epoch()
        if not self._persistent() or self._iterator is None:
            # the iterator about to be made draws the workers' base seed from the loader's generator
            self._replay = (s.epoch, self._loader_generator.get_state())
        self._token += 1
        inner = super().__iter__()
        return self._consume(inner, self._token, s._token)

    def _consume(self, inner: Iterator[Any], token: int, sampler_token: int) -> Iterator[Any]:
        s = self.sampler
        finished = False
        while True:
            if not finished and (token != self._token or sampler_token != s._token):
                raise RuntimeError(
                    "ResumableDataLoader: this iterator is stale: the loader was iterated again, moved "
                    "(set_epoch/advance) or restored since it started; call iter(loader) again"
                )
            try:
                batch = next(inner)
            except StopIteration:
                break
            s._count(1 if self.batch_size is None else min(self.batch_size, s.size - s.position))
            if self._epoch_done():
                s._next_epoch()
                finished = True
            yield batch
        if not finished and token == self._token and sampler_token == s._token:
            s._next_epoch()  # an epoch with no batches at all

    def state_dict(self) -> dict[str, Any]:
        """``{"sampler": sampler state, "generator": the loader generator's state at the epoch's start}``."""
        s = self.sampler
        generator = self._loader_generator.get_state()
        if self._replay is not None and (self._persistent() or self._replay[0] == s.epoch):
            generator = self._replay[1].clone()
        return {"sampler": s.state_dict(), "generator": generator}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a saved state; :class:`~cairn.RestoreError` (changing nothing) if it does not fit."""
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"sampler", "generator"}:
            got = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else _kind(state_dict)
            raise RestoreError(
                f"ResumableDataLoader: expected a state with keys ['generator', 'sampler'], got {got}"
            )
        try:
            generator = _byte_tensor(state_dict["generator"], self._loader_generator.get_state().numel())
        except _Unfit as e:
            raise RestoreError(f"ResumableDataLoader: saved 'generator': {e}") from None
        self.sampler._check(state_dict["sampler"])
        self.sampler.load_state_dict(state_dict["sampler"])
        self._loader_generator.set_state(generator)
        self._replay = None
        self._token += 1
        if self._iterator is not None:
            self._iterator = None  # persistent workers were seeded before; the next iter() makes new ones


def resumable_loader(
    dataset: Any,
    *,
    batch_size: int | None = 1,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    **dataloader_kwargs: Any,
) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader`: a ``DataLoader`` that a checkpoint resumes mid-epoch, exactly.

    ::

        loader = cairn.resumable_loader(dataset, batch_size=32, shuffle=True, seed=0, num_workers=4)
        state = {"model": model, "optim": opt, "rng": cairn.RNGState(), "data": loader}
    """
    return ResumableDataLoader(
        dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, **dataloader_kwargs
    )
