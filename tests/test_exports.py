"""The public API is exactly ``cairn.__all__``: sorted, complete, and every name documented."""

from __future__ import annotations

import cairn
import cairn.errors


def test_all_is_sorted_and_exported() -> None:
    names = [n for n in cairn.__all__ if n != "__version__"]
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    for name in cairn.__all__:
        assert hasattr(cairn, name), name


def test_every_public_name_has_a_docstring() -> None:
    for name in cairn.__all__:
        obj = getattr(cairn, name)
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name


def test_every_error_is_a_cairn_error_and_exported() -> None:
    for name in cairn.errors.__all__:
        cls = getattr(cairn.errors, name)
        assert issubclass(cls, cairn.CairnError)
        assert getattr(cairn, name) is cls
