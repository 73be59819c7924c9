"""Recognise what a path that is not a cairn store holds, to say so and say what to do. Reads bytes only."""

from __future__ import annotations

import os
import stat

__all__ = ["describe_foreign"]


def describe_foreign(path: str) -> str:
    """A message for a path that is not a cairn store: what it looks like and the way forward."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return f"{path} is a directory but not a cairn store"
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a cairn store: it is not a directory (nor even a regular file)"
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"{path} is not a cairn store ({e.strerror})"
    base = f"{path} is a file, not a cairn store (a store is a directory)"
    if head.startswith(b"PK\x03\x04"):
        return (
            f"{base}: it looks like a torch.save zip archive. cairn never unpickles; convert the weights "
            "with `cairn import` (weights-only, safe) and load the result"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"{base}: it is a pickle. cairn never unpickles, since loading a pickle can run code"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < (1 << 28) and head[8:9] == b"{":
        return f"{base}: it looks like a safetensors file; import it with `cairn import`"
    if head.lstrip()[:1] == b"{":
        name = os.path.basename(path)
        return f"{base}: it is a JSON file ({name}); pass the store's directory instead"
    return base
