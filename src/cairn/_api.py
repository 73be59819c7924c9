"""The one-off functions: :func:`save`, :func:`load`, :func:`restore`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from cairn._info import CheckpointInfo
from cairn._restore import Rename, RestoreReport, restore_into
from cairn._store import DEFAULT_CHUNK_SIZE, Store
from cairn.backends import Backend

__all__ = ["load", "restore", "save"]

Target = str | os.PathLike[str] | Backend | Store


def _store(target: Target, create: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Store:
    return target if isinstance(target, Store) else Store(target, create=create, chunk_size=chunk_size)


def save(
    target: Target,
    state: Any,
    *,
    step: int | None = None,
    name: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> CheckpointInfo:
    """Save ``state`` as a new checkpoint in the store at ``target`` (created if new); durable on return.

    ``state`` is any tree of dicts, lists, tuples, tensors, numpy arrays, plain values and objects with
    ``state_dict()``. Example::

        info = cairn.save("ckpts", {"model": model, "optim": opt, "epoch": 3}, step=300,
                          metrics={"val_loss": 0.21})
        info.bytes_written   # 0 when nothing changed since the last checkpoint
    """
    store = _store(target, create=True, chunk_size=chunk_size)
    return store.save(state, step=step, name=name, metrics=metrics, metadata=metadata)


def load(
    target: Target,
    name: str = "latest",
    *,
    keys: str | Iterable[str] | None = None,
    map_location: Any = None,
    verify: bool = True,
    mmap: bool = True,
) -> Any:
    """The state tree of checkpoint ``name`` (default the latest) as plain tensors and values.

    Objects saved through ``state_dict()`` come back as their state dicts. ``keys`` selects leaves by
    glob over dotted paths (``"model.*"``, ``["optim", "epoch"]``) and reads nothing else. Every chunk is
    hashed before its tensor is returned unless ``verify=False``. Tensors of 1 MiB and more are
    memory-mapped (copy-on-write, in huge pages where the system has them) unless ``mmap=False``; either
    way their bytes are read, by several threads, before ``load`` returns. Tensors load on the CPU unless
    ``map_location`` says otherwise.
    """
    return _store(target).load(name, keys=keys, map_location=map_location, verify=verify, mmap=mmap)


def restore(
    target: Target,
    state: Any,
    name: str = "latest",
    *,
    strict: bool = True,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    rename: Rename | None = None,
    verify: bool = True,
) -> RestoreReport:
    """Load checkpoint ``name`` into the live objects of ``state``; returns a :class:`RestoreReport`.

    Modules are loaded key by key, other stateful objects through ``load_state_dict``, tensors and
    arrays in place, plain values assigned into their dict or list. ``strict=True`` raises
    :class:`~cairn.RestoreError` listing every missing, unexpected and mismatched key, changing nothing.
    Only what you pass must fit: restoring ``{"model": m}`` from a checkpoint that also holds an
    optimizer and an epoch is fine (those are listed in ``report.unused``).
    For fine-tuning, ``strict=False`` loads what fits, ``rename={"backbone.": "encoder."}`` (or a
    function) maps saved key prefixes to live ones, and ``include``/``exclude`` globs pick keys.
    """
    store = _store(target)
    manifest = store.manifest(name)
    saved = store.load(manifest.name, verify=verify)
    report = RestoreReport(checkpoint=manifest.name, step=manifest.step)
    return restore_into(
        state, saved, strict=strict, include=include, exclude=exclude, rename=rename, report=report
    )
