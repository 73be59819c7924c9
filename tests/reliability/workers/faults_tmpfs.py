"""C9(a) worker: a real full disk (a small tmpfs), filled so that only ``k`` new blobs fit, then a save.

Importable (the test calls :func:`run_scenario` itself when it could mount the tmpfs as root) and runnable
(``faults_tmpfs.py MOUNT K [K...]`` prints the JSON outcome: the non-root fallback runs it inside
``unshare --user --map-root-user --mount`` after mounting there).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from typing import Any

import numpy as np

CHUNK = 256 * 1024
NEW_BLOBS = 4
"""The new state's big array is ``NEW_BLOBS`` chunks; its small arrays add a few more tiny blobs."""


def state(seed: int, big: bool) -> dict[str, Any]:
    """A state with one ``NEW_BLOBS``-chunk array (when ``big``) and two small ones."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"small": rng.standard_normal(16), "ints": np.arange(7) + seed}
    if big:
        out["big"] = rng.standard_normal(NEW_BLOBS * CHUNK // 8)
    return out


def fingerprint(value: Any) -> Any:
    """Bytes, dtype and shape of every array (the bit-identity check, without importing torch)."""
    if isinstance(value, dict):
        return {k: fingerprint(v) for k, v in sorted(value.items())}
    arr = np.asarray(value)
    return (str(arr.dtype), arr.shape, arr.tobytes().hex())


def one(mount: str, k: int) -> dict[str, Any]:
    """Fill ``mount`` to leave room for ``k`` new blobs, save, check, free the space, save again."""
    import cairn
    from cairn.errors import BackendError

    root = os.path.join(mount, f"store-{k}")
    filler = os.path.join(mount, "filler")
    res: dict[str, Any] = {"k": k, "problems": []}

    def check(ok: bool, what: str) -> None:
        if not ok:
            res["problems"].append(what)

    store = cairn.Store(root, create=True, chunk_size=CHUNK)
    before = state(1, big=False)
    store.save(before, step=1)
    st = os.statvfs(mount)
    room = k * CHUNK + CHUNK // 2  # k chunks plus the tiny blobs and the manifest (a page each)
    fill = st.f_bavail * st.f_frsize - room
    with open(filler, "wb") as f:
        f.truncate(0)
        if fill > 0:
            f.write(b"\0" * fill)  # tmpfs counts written pages, not sparse size
    new = state(2, big=True)
    try:
        store.save(new, step=2)
        res["saved"] = True
    except BackendError as e:
        res["saved"] = False
        res["errno"] = e.errno
        res["message"] = str(e)
        check(e.errno == errno.ENOSPC, f"errno {e.errno}, not ENOSPC")
        check("free space" in str(e), f"the message gives no fix: {e}")
        check(("blobs/" in str(e)) or ("checkpoints/" in str(e)), f"the message names no path: {e}")
    except Exception as e:
        res["saved"] = False
        check(False, f"untyped error {type(e).__name__}: {e}")
    fresh = cairn.Store(root)
    names = fresh.names()
    res["names"] = names
    if not res["saved"]:
        check(names == ["step-1"], f"a manifest appeared for the failed step: {names}")
        latest = fresh.latest()
        check(latest is not None and latest.name == "step-1", f"latest() moved to {latest}")
    check(fingerprint(fresh.load("step-1")) == fingerprint(before), "step-1 does not restore bit-identically")
    res["data_lost"] = int(fingerprint(fresh.load("step-1")) != fingerprint(before))
    report = fresh.verify()
    check(report.ok, f"verify: {report.problems}")
    res["tmp_left"] = len(list(fresh.backend.list("tmp")))
    os.unlink(filler)  # free the space
    fresh.gc(grace=0)
    check(not list(fresh.backend.list("tmp")), "gc left temporary files")
    if not res["saved"]:
        store.save(new, step=2)  # the same handle: a full disk does not poison it
    again = cairn.Store(root)
    check(
        fingerprint(again.load("step-2")) == fingerprint(new), "step-2 does not restore after freeing space"
    )
    check(again.verify().ok, "verify after the retry")
    shutil.rmtree(root)
    return res


def run_scenario(mount: str, ks: list[int]) -> list[dict[str, Any]]:
    """:func:`one` for every ``k``."""
    return [one(mount, k) for k in ks]


if __name__ == "__main__":
    print(json.dumps(run_scenario(sys.argv[1], [int(a) for a in sys.argv[2:]])))
