"""Restore a checkpoint into live objects: ``load_state_dict`` for stateful objects, in place for the rest.

Entries are matched by dotted key path. A ``torch.nn.Module`` is matched key by key (so a backbone can be
loaded into a model with a new head); any other stateful object (optimizer, scheduler, your own) is
matched as a whole; tensors and arrays are copied in place; plain values are assigned into their
container. Everything is checked before anything is changed: a strict restore that fails leaves the
live objects untouched.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cairn._codec import is_array
from cairn._tree import format_path, is_stateful, key_matcher
from cairn.errors import RestoreError

__all__ = ["Mismatch", "RestoreReport", "restore_into"]

Rename = Mapping[str, str] | Callable[[str], str | None]


@dataclass(frozen=True)
class Mismatch:
    """A key whose saved value does not fit the live one."""

    key: str
    saved: str
    expected: str


@dataclass
class RestoreReport:
    """What :func:`cairn.restore` did: keys loaded, missing from the checkpoint, unexpected, mismatched."""

    checkpoint: str = ""
    step: int = 0
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Live keys the checkpoint has no value for (left as they were)."""
    unexpected: list[str] = field(default_factory=list)
    """Saved keys inside an object or container you passed that nothing live corresponds to (ignored)."""
    unused: list[str] = field(default_factory=list)
    """Saved keys outside everything you passed (say ``"epoch"`` when you restore only the model): not
    restored, and never an error."""
    mismatched: list[Mismatch] = field(default_factory=list)
    """Keys whose saved shape or type does not fit (left as they were)."""
    skipped: list[str] = field(default_factory=list)
    """Keys excluded by ``include``/``exclude``, or plain values inside tuples (immutable)."""

    @property
    def ok(self) -> bool:
        """True when every live key was loaded and nothing saved was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """A multi-line description of every problem."""
        lines = []
        if self.missing:
            lines.append(f"missing from the checkpoint ({len(self.missing)}): {', '.join(self.missing[:20])}")
        if self.unexpected:
            shown = ", ".join(self.unexpected[:20])
            lines.append(f"unexpected in the checkpoint ({len(self.unexpected)}): {shown}")
        for m in self.mismatched[:20]:
            lines.append(f"mismatched {m.key}: saved {m.saved}, live {m.expected}")
        return "\n".join(lines) or "ok"


@dataclass(frozen=True)
class _Target:
    name: str
    how: str  # "module", "object", "inplace", "assign", "readonly"
    owner: Any
    key: Any
    live: Any
    base: str = ""
    """For module keys: the module's own path."""


def _describe(value: Any) -> str:
    if is_array(value):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{type(value).__name__}{list(value.shape)} {dtype}"
    return type(value).__name__


def _has_state(value: Any, depth: int = 0) -> bool:
    """Whether a container holds a stateful object or an array (and so is restored piece by piece)."""
    if depth > 64:
        return False
    if is_stateful(value) or is_array(value):
        return True
    if isinstance(value, Mapping):
        return any(_has_state(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_state(v, depth + 1) for v in value)
    return False


def _is_module(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _targets(
    value: Any, path: tuple[Any, ...], owner: Any, key: Any, out: list[_Target], scopes: set[str]
) -> None:
    """Collect what can be restored into ``value``; ``scopes`` gets the dotted paths of the live objects
    and containers passed (saved keys under them that match nothing are "unexpected")."""
    name = format_path(path)
    if path:
        scopes.add(name)
    if _is_module(value):
        prefix = f"{name}." if name else ""
        for k, v in value.state_dict(keep_vars=True).items():
            out.append(_Target(prefix + k, "module", value, k, v, name))
    elif is_stateful(value):
        out.append(_Target(name, "object", value, None, value))
    elif isinstance(value, Mapping | list | tuple) and (not path or _has_state(value)):
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for k, v in items:
            _targets(v, (*path, k), value, k, out, scopes)
    elif is_array(value) and not isinstance(value, np.generic):
        out.append(_Target(name, "inplace", owner, key, value))
    else:
        how = "readonly" if isinstance(owner, tuple) or owner is None else "assign"
        out.append(_Target(name, how, owner, key, value))


def _index(value: Any, path: tuple[Any, ...], nodes: dict[str, Any], leaves: list[str]) -> None:
    name = format_path(path)
    nodes[name] = value
    if isinstance(value, Mapping):
        for k, v in value.items():
            _index(v, (*path, k), nodes, leaves)
        if value:
            return
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _index(v, (*path, i), nodes, leaves)
        if value:
            return
    leaves.append(name)


def _renamer(rename: Rename | None) -> Callable[[str], str | None]:
    if rename is None:
        return lambda name: name
    if callable(rename):
        return rename
    prefixes = sorted(rename.items(), key=lambda kv: len(kv[0]), reverse=True)

    def apply(name: str) -> str:
        for old, new in prefixes:
            if name == old or name.startswith(old if old.endswith(".") or not old else old + "."):
                return new + name[len(old) :]
        return name

    return apply


def _filter(
    include: Iterable[str] | str | None, exclude: Iterable[str] | str | None
) -> Callable[[str], bool]:
    inc, exc = key_matcher(include), key_matcher(exclude)
    return lambda name: (inc is None or inc(name)) and not (exc is not None and exc(name))


def restore_into(
    live: Any,
    saved: Any,
    *,
    strict: bool = True,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    rename: Rename | None = None,
    report: RestoreReport | None = None,
) -> RestoreReport:
    """Load the plain tree ``saved`` into the live objects of ``live``; see the module docstring."""
    report = report if report is not None else RestoreReport()
    targets: list[_Target] = []
    scopes: set[str] = set()
    _targets(live, (), None, None, targets, scopes)
    everything = not isinstance(live, Mapping | list | tuple)  # a bare module or object: all is in scope
    raw_nodes: dict[str, Any] = {}
    raw_leaves: list[str] = []
    _index(saved, (), raw_nodes, raw_leaves)
    renamer = _renamer(rename)
    nodes: dict[str, Any] = {}
    for name, value in raw_nodes.items():
        new = renamer(name) if name else name
        if new is not None:
            nodes.setdefault(new, value)
    leaves = [n for n in (renamer(leaf) for leaf in raw_leaves) if n is not None]
    wanted = _filter(include, exclude)

    plan: list[tuple[_Target, Any]] = []
    for t in targets:
        if not wanted(t.name):
            report.skipped.append(t.name)
        elif t.name not in nodes:
            report.missing.append(t.name)
        else:
            value = nodes[t.name]
            problem = _mismatch(t, value)
            if problem:
                report.mismatched.append(Mismatch(t.name, _describe(value), problem))
            elif t.how == "readonly":
                report.skipped.append(t.name)
            else:
                plan.append((t, value))
    whole = [t.name for t in targets if t.how in ("object", "assign", "readonly")]
    exact = {t.name for t in targets}
    for leaf in leaves:
        if not leaf or not wanted(leaf) or leaf in exact:
            continue
        if any(leaf.startswith(w + ".") if w else True for w in whole):
            continue
        if everything or any(leaf == s or leaf.startswith(s + ".") for s in scopes):
            report.unexpected.append(leaf)
        else:
            report.unused.append(leaf)
    if strict and not report.ok:
        raise RestoreError(
            f"checkpoint {report.checkpoint!r} does not fit the live objects (strict=True):\n"
            f"{report.summary()}\nNothing was changed. Pass strict=False to load what fits, "
            "or rename=/include=/exclude= to map keys."
        )
    _apply(plan, nodes if rename is None else {})
    report.loaded.extend(t.name for t, _ in plan)
    return report


def _mismatch(t: _Target, value: Any) -> str | None:
    if t.how in ("module", "inplace"):
        if not is_array(value) or isinstance(value, np.generic):
            return _describe(t.live)
        if tuple(value.shape) != tuple(t.live.shape):
            return _describe(t.live)
        if t.how == "inplace" and isinstance(t.live, np.ndarray) != isinstance(value, np.ndarray):
            return _describe(t.live)
    return None


def _apply(plan: list[tuple[_Target, Any]], nodes: Mapping[str, Any]) -> None:
    """Change the live objects. ``nodes`` gives saved module states, whose torch ``_metadata`` is kept."""
    modules: dict[int, tuple[Any, OrderedDict[str, Any]]] = {}
    for t, value in plan:
        if t.how == "module":
            if id(t.owner) not in modules:
                state: OrderedDict[str, Any] = OrderedDict()
                meta = getattr(nodes.get(t.base), "_metadata", None)
                if meta is not None:
                    state._metadata = meta  # type: ignore[attr-defined]
                modules[id(t.owner)] = (t.owner, state)
            modules[id(t.owner)][1][t.key] = value
        elif t.how == "object":
            t.owner.load_state_dict(value)
        elif t.how == "inplace":
            if isinstance(t.live, np.ndarray):
                t.live[...] = value
            else:
                import torch

                with torch.no_grad():
                    t.live.copy_(value)
        else:
            t.owner[t.key] = value
    for module, state in modules.values():
        module.load_state_dict(state, strict=False)
