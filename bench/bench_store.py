#!/usr/bin/env python
"""Benchmark cairn's store against torch.save, safetensors, torch.distributed.checkpoint and the machine.

    python bench/bench_store.py [--states small,medium,finetune,embedding] [--repeats 3] [--size-gb G]
                                [--quick] [--dir DIR] [--json OUT] [--seed 0]

States (bench/states.py): GPT-2 small + AdamW (445 tensors, 1.49 GB), GPT-2 medium (292 tensors, 1.42 GB),
a fine-tune of GPT-2 medium with 90% of the parameters frozen, and an embedding table where 1% of the rows
change between saves. Systems (bench/peers.py): cairn sync, async (CheckpointManager) and incremental;
torch.save, safetensors, DCP (sync, thread_count=2, async). Ceilings (bench/ceilings.py): O_DIRECT and
buffered disk writes, cold and warm reads, memcpy, BLAKE3. Every save is durable when its timer stops;
every load is checked against the saved state; cold loads run after the page cache is dropped. The table
shows medians of ``--repeats``, each figure also as a ratio to the best peer and to the ceiling; ``--json``
writes every sample. See bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ceilings import READ_COLD, READ_WARM, WRITE, Ceilings
from harness import (
    GB,
    NO_DROP,
    MiB,
    Sample,
    files_under,
    find_evictor,
    fmt,
    log,
    machine_info,
    machine_lines,
    markdown,
    measured,
    median,
    resident_fraction,
    same_checksum,
    scratch_dir,
    touch,
    tree_size,
    write_json,
)
from peers import CAIRN_LAZY, CAIRN_LOADS, CairnAsync, SaveTimes, cairn_lazy, cairn_save, peer_systems
from states import BUILDERS, Flat, Pair, Workload, describe, nest

CAIRN_FULL = "cairn.save (sync), full"
CAIRN_ASYNC_FULL = "cairn async, full (new store)"
CAIRN_ASYNC_REUSED = "cairn async, full (staging buffer reused)"
QUICK_GB = 0.05


@dataclass
class Section:
    """A group of rows compared with each other: the peers, the ceiling kind and the logical bytes."""

    kind: str  # "save", "cold" or "warm": which ceiling applies
    nbytes: int
    peers: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    full: dict[str, str] = field(default_factory=dict)  # 2nd-save op -> the full save it is a fraction of


class Runner:
    """Runs the operations and keeps every sample by (section, operation)."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.evict, self.cache_method = find_evictor(root)
        self.sections: dict[str, Section] = {}
        self.samples: dict[tuple[str, str], list[Sample]] = {}
        self.cached_at_start: list[float] = []
        self.peers = peer_systems()
        self.expected: tuple[Flat | None, tuple[int, float]] = (None, (0, 0.0))  # (state, touch(state))

    def section(self, name: str, kind: str, nbytes: int) -> Section:
        return self.sections.setdefault(name, Section(kind, nbytes))

    def add(self, section: str, op: str, sample: Sample, peer: bool = False) -> None:
        sec = self.sections[section]
        if op not in sec.ops:
            sec.ops.append(op)
        if peer and op not in sec.peers:
            sec.peers.append(op)
        self.samples.setdefault((section, op), []).append(sample)
        extra = f", blocking {sample.blocking:.3f} s" if sample.blocking is not None else ""
        wrote = f", {sample.bytes_written / GB:.3f} GB written" if sample.bytes_written is not None else ""
        log(f"{section} | {op}: {sample.seconds:.3f} s{extra}{wrote}")

    # -- saves ----------------------------------------------------------------------------------------

    def save(self, section: str, op: str, fn: Callable[[], SaveTimes], out: Path, peer: bool = False) -> None:
        """One save into ``out``; bytes written is how much the files under ``out`` grew."""
        before = tree_size(out)
        times, rss = measured(fn)
        sample = Sample(times.durable, times.blocking, tree_size(out) - before, rss)
        self.add(section, op, sample, peer)

    def saves(self, wl: Workload, pair: Pair, r: int) -> None:
        """Every system's full save of ``pair.first``; cairn's second save of ``pair.second``; loads."""
        sec = f"{wl.name}: save" + (f" [{pair.label}]" if len(wl.pairs) > 1 else "")
        self.section(sec, "save", wl.nbytes)
        second = f"2nd save ({pair.label})"
        base = self.root / f"{wl.name}-{r}"
        base.mkdir(exist_ok=True)

        store = base / "cairn"
        self.save(sec, CAIRN_FULL, lambda: cairn_save(store, pair.first, 0), store)
        self.save(sec, f"cairn.save (sync), {second}", lambda: cairn_save(store, pair.second, 1), store)
        self.sections[sec].full[f"cairn.save (sync), {second}"] = CAIRN_FULL
        if wl.full:
            self.loads(wl, pair.first, store, CAIRN_LOADS, (CAIRN_LAZY, cairn_lazy), peer=False)
        shutil.rmtree(store)

        astore = base / "cairn-async"
        mgr = CairnAsync(astore)
        try:
            self.save(sec, CAIRN_ASYNC_FULL, lambda: mgr.save(pair.first, 1), astore)
            self.save(sec, f"cairn async, {second}", lambda: mgr.save(pair.second, 2), astore)
            self.sections[sec].full[f"cairn async, {second}"] = CAIRN_ASYNC_FULL
            if wl.full:  # steady state: every tensor changed (negated: exact and undone below)
                negate(pair.first)
                try:
                    self.save(sec, CAIRN_ASYNC_REUSED, lambda: mgr.save(pair.first, 3), astore)
                finally:
                    negate(pair.first)
        finally:
            mgr.close()
        shutil.rmtree(astore)

        first = next((p for p in wl.pairs if p.first is pair.first), pair)
        if first is not pair:  # the same state as an earlier pair's: its peer saves stand for this one too
            src = f"{wl.name}: save [{first.label}]"
            for op in self.sections[src].peers:
                if (sec, op) in self.samples:
                    continue
                self.samples[(sec, op)] = self.samples[(src, op)]
                self.sections[sec].ops.append(op)
                self.sections[sec].peers.append(op)
            shutil.rmtree(base)
            return
        loaded: set[str] = set()
        for system in self.peers:
            out = base / system.save_name.replace(" ", "_")
            self.save(sec, system.save_name, lambda s=system, o=out: s.save(o, pair.first), out, peer=True)  # type: ignore[misc]
            if wl.full and system.fmt not in loaded:
                loaded.add(system.fmt)
                self.loads(
                    wl,
                    pair.first,
                    out,
                    [(system.load_name, system.load)],
                    (system.lazy_name, system.lazy),
                    True,
                )
            shutil.rmtree(out)
        shutil.rmtree(base)

    # -- loads ----------------------------------------------------------------------------------------

    def loads(
        self,
        wl: Workload,
        flat: Flat,
        out: Path,
        loaders: list[tuple[str, Callable[[Path, Flat], Any]]],
        lazy: tuple[str, Callable[[Path, str, torch.Tensor], torch.Tensor]],
        peer: bool,
    ) -> None:
        """Full loads (cold, then warm) of ``out``, each checked; then the lazy read of one tensor."""
        if self.expected[0] is not flat:
            self.expected = (flat, touch(nest(flat)))
        expected = self.expected[1]
        temps = ("cold", "warm") if self.evict is not None else ("warm",)
        for name, fn in loaders:
            for temp in temps:
                sec = f"{wl.name}: full load, {temp}"
                self.section(sec, temp, wl.nbytes)
                self.cold(out, temp)

                def run(fn: Callable[[Path, Flat], Any] = fn) -> tuple[int, float]:
                    t0 = time.perf_counter()
                    tree = fn(out, flat)
                    got = touch(tree)
                    self.last = time.perf_counter() - t0
                    return got

                got, rss = measured(run)
                if not same_checksum(got, expected):
                    raise SystemExit(f"{name} returned different tensors: {got} != {expected}")
                self.add(sec, name, Sample(self.last, rss_added=rss), peer)
        key = wl.lazy_key
        like = flat[key]
        name, read = lazy
        for temp in temps:
            sec = f"{wl.name}: lazy read of {key.split('/', 1)[1]} ({like.nbytes / MiB:.1f} MiB), {temp}"
            self.section(sec, temp, like.nbytes)
            self.cold(out, temp)

            def one() -> torch.Tensor:
                t0 = time.perf_counter()
                t = read(out, key, like)
                touch(t)
                self.last = time.perf_counter() - t0
                return t

            t, rss = measured(one)
            if not torch.equal(t, like):
                raise SystemExit(f"{name} returned a different tensor for {key}")
            del t
            self.add(sec, name, Sample(self.last, rss_added=rss), peer)

    def cold(self, out: Path, temp: str) -> None:
        """Empty the page cache of ``out``'s files before a cold run."""
        if temp == "cold" and self.evict is not None:
            paths = files_under(out)
            self.evict(paths)
            left = resident_fraction(paths)
            if left is not None:
                self.cached_at_start.append(left)

    last = 0.0


def negate(flat: Flat) -> None:
    """Negate every tensor in place (exact; twice restores the state)."""
    for t in {id(t): t for t in flat.values()}.values():
        t.neg_()


# -- the report ---------------------------------------------------------------------------------------

HEADER = [
    "operation",
    "seconds",
    "GB/s",
    "vs best peer",
    "vs ceiling",
    "blocking s",
    "blocking vs best peer",
    "bytes written",
    "2nd save / full save",
    "peak RSS added",
]


def ceiling_rates(ceil: dict[str, list[float | None]], nbytes: int) -> dict[str, float]:
    """Bytes per second of each ceiling kind: save (the faster write), cold, warm."""
    rate = {op: nbytes / s for op, xs in ceil.items() if (s := median(xs))}
    out = {}
    if writes := [rate[w] for w in WRITE if w in rate]:
        out["save"] = max(writes)
    for kind, op in (("cold", READ_COLD), ("warm", READ_WARM)):
        if op in rate:
            out[kind] = rate[op]
    return out


def report(
    runner: Runner, ceil: dict[str, list[float | None]], ceil_bytes: int
) -> tuple[str, list[dict[str, Any]]]:
    """The markdown table and one record per row (medians and ratios)."""
    rates = ceiling_rates(ceil, ceil_bytes)
    rows: list[list[str]] = [["**ceilings**", *[""] * (len(HEADER) - 1)]]
    records: list[dict[str, Any]] = []
    for op, xs in ceil.items():
        s = median(xs)
        rows.append([f"*{op}*", fmt(s), fmt(ceil_bytes / s / GB if s else None, ".2f"), *[""] * 7])
        records.append({"section": "ceilings", "operation": op, "seconds": s, "bytes": ceil_bytes})
    for name, sec in runner.sections.items():
        rows.append([f"**{name}**", *[""] * (len(HEADER) - 1)])
        med = {op: summarize(runner.samples[(name, op)]) for op in sec.ops}
        best = min((med[p]["seconds"] for p in sec.peers), default=None)
        best_block = min((med[p]["blocking"] for p in sec.peers), default=None)
        rate = rates.get(sec.kind)
        for op in sec.ops:
            m = med[op]
            s, block, wrote = m["seconds"], m["blocking"], m["bytes_written"]
            full = med.get(sec.full.get(op, ""))
            frac_t = s / full["seconds"] if full else None
            frac_b = (
                wrote / full["bytes_written"]
                if full and wrote is not None and full["bytes_written"]
                else None
            )
            rec = {
                "section": name,
                "operation": op,
                "peer": op in sec.peers,
                "bytes": sec.nbytes,
                **m,
                "gb_per_s": sec.nbytes / s / GB,
                "vs_best_peer": s / best if best else None,
                "vs_ceiling": s * rate / sec.nbytes if rate else None,
                "blocking_vs_best_peer": block / best_block if best_block and block is not None else None,
                "full_save": sec.full.get(op),
                "vs_full_save_time": frac_t,
                "vs_full_save_bytes": frac_b,
            }
            records.append(rec)
            rows.append(
                [
                    op,
                    fmt(s),
                    fmt(rec["gb_per_s"], ".2f"),
                    fmt(rec["vs_best_peer"], ".2f", "×"),
                    fmt(rec["vs_ceiling"], ".2f", "×"),
                    fmt(block) if sec.kind == "save" else "",
                    fmt(rec["blocking_vs_best_peer"], ".2f", "×") if sec.kind == "save" else "",
                    "" if wrote is None else f"{wrote / GB:.3f} GB",
                    "" if frac_t is None else f"{frac_t:.2f}× time, {fmt(frac_b, '.1%')} bytes",
                    fmt(None if m["rss_added"] is None else m["rss_added"] / GB, ".2f", " GB"),
                ]
            )
    return markdown(HEADER, rows), records


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Medians of one operation's samples."""
    return {
        "seconds": median([x.seconds for x in samples]),
        "blocking": median([x.seconds if x.blocking is None else x.blocking for x in samples]),
        "bytes_written": median([x.bytes_written for x in samples]),
        "rss_added": median([x.rss_added for x in samples]),
        "samples": len(samples),
    }


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets as ratios from this run (speedups: >1 means cairn is faster)."""
    by = {(r["section"], r["operation"]): r for r in records}
    out: list[dict[str, Any]] = []

    def add(target: str, section: str, op: str, ref: str | None, value: float | None, how: str) -> None:
        if value is not None:
            out.append(
                {
                    "target": target,
                    "section": section,
                    "cairn": op,
                    "reference": ref,
                    "value": value,
                    "how": how,
                }
            )

    def fastest_peer(section: str) -> dict[str, Any] | None:
        peers = [r for r in records if r["section"] == section and r.get("peer")]
        return min(peers, key=lambda r: r["seconds"]) if peers else None

    for r in records:
        sec, op = r["section"], r["operation"]
        if op == CAIRN_FULL and (p := fastest_peer(sec)):
            add(
                "durable sync save GB/s vs fastest peer",
                sec,
                op,
                p["operation"],
                p["seconds"] / r["seconds"],
                "speedup",
            )
        if op in (CAIRN_ASYNC_FULL, CAIRN_ASYNC_REUSED) and (d := by.get((sec, "dcp.async_save"))):
            add(
                "async save caller blocking vs dcp.async_save",
                sec,
                op,
                "dcp.async_save",
                d["blocking"] / r["blocking"],
                "speedup",
            )
        if sec.startswith("finetune") and r.get("vs_full_save_time") is not None:
            add(
                "fine-tune 2nd save time / full save",
                sec,
                op,
                r["full_save"],
                r["vs_full_save_time"],
                "fraction",
            )
            add(
                "fine-tune 2nd save bytes / full save",
                sec,
                op,
                r["full_save"],
                r["vs_full_save_bytes"],
                "fraction",
            )
        if op == "cairn.load (verify=True)" and sec.endswith("cold") and (p := fastest_peer(sec)):
            add(
                "cold verified full load vs fastest peer",
                sec,
                op,
                p["operation"],
                p["seconds"] / r["seconds"],
                "speedup",
            )
        if op == CAIRN_LAZY and (s := by.get((sec, "safe_open().get_tensor(key)"))):
            add(
                "lazy one-tensor read vs safe_open().get_tensor()",
                sec,
                op,
                s["operation"],
                s["seconds"] / r["seconds"],
                "speedup",
            )
        if (
            op == "cairn.load (verify=False)"
            and sec.endswith("warm")
            and (s := by.get((sec, "safetensors.load_file")))
        ):
            add(
                "verify=False warm load vs safetensors warm load",
                sec,
                op,
                s["operation"],
                s["seconds"] / r["seconds"],
                "speedup",
            )
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    return markdown(
        ["target", "section", "cairn row", "reference", "value"],
        [
            [
                t["target"],
                t["section"],
                t["cairn"],
                t["reference"] or "",
                f"{t['value']:.2f}× (>1: cairn faster)" if t["how"] == "speedup" else f"{t['value']:.1%}",
            ]
            for t in rows
        ],
    )


# -- main ---------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--states", default=",".join(BUILDERS), help=f"comma-separated, of {', '.join(BUILDERS)}")
    p.add_argument("--size-gb", type=float, default=None, help="shrink every state to about this many GB")
    p.add_argument("--repeats", type=int, default=3, help="runs per operation, median reported; default 3")
    p.add_argument("--quick", action="store_true", help=f"smoke run: --size-gb {QUICK_GB} --repeats 1")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default bench/results/tmp)")
    p.add_argument("--json", type=Path, default=None, help="write every sample and the medians here")
    p.add_argument("--seed", type=int, default=0, help="seed of the random states; default 0")
    args = p.parse_args(argv)
    if args.quick:
        args.size_gb, args.repeats = args.size_gb or QUICK_GB, 1
    args.states = [s.strip() for s in args.states.split(",") if s.strip()]
    if unknown := set(args.states) - set(BUILDERS):
        p.error(f"unknown states {sorted(unknown)}; choose from {', '.join(BUILDERS)}")
    if (args.size_gb is not None and args.size_gb <= 0) or args.repeats < 1:
        p.error("--size-gb must be positive and --repeats at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    with scratch_dir(args.dir, "bench-store-") as root:
        info = machine_info(root)
        runner = Runner(root, args)
        log(f"cold loads: {runner.cache_method}")
        ceil_bytes = int((args.size_gb or 1.5) * GB)
        ceilings = Ceilings(root, ceil_bytes, args.seed)
        ceil: dict[str, list[float | None]] = {}
        for r in range(args.repeats):
            for op, s in ceilings.run(runner.evict).items():
                ceil.setdefault(op, []).append(s)
                log(f"ceiling {r + 1}/{args.repeats} | {op}: {fmt(s)} s")
        ceil_bytes = ceilings.nbytes
        del ceilings
        workloads: list[dict[str, Any]] = []
        for name in args.states:
            t0 = time.perf_counter()
            wl = BUILDERS[name](args.seed, args.size_gb)
            pairs = [
                {"label": p.label, "first": describe(p.first), "changed_bytes": p.changed_bytes}
                for p in wl.pairs
            ]
            workloads.append(
                {"name": name, "description": wl.description, "bytes": wl.nbytes, "pairs": pairs}
            )
            log(
                f"{name}: {wl.description}; {describe(wl.pairs[0].first)}; "
                f"built in {time.perf_counter() - t0:.1f} s"
            )
            for r in range(args.repeats):
                for pair in wl.pairs:
                    runner.saves(wl, pair, r)
            del wl
    elapsed = time.perf_counter() - started

    text, records = report(runner, ceil, ceil_bytes)
    goals = targets(records)
    out = [f"# cairn store benchmark: median of {args.repeats}, {elapsed / 60:.1f} min in all\n"]
    for w in workloads:
        how = "; ".join(
            f"{p['label']}: {p['first']}, {p['changed_bytes'] / GB:.3f} GB changed" for p in w["pairs"]
        )
        out.append(f"- state `{w['name']}`: {w['description']} ({how})")
    out += machine_lines(info)
    out.append(f"- cold loads: {runner.cache_method}")
    if runner.cached_at_start:
        out.append(f"- page cache left before cold runs (mincore): at most {max(runner.cached_at_start):.1%}")
    out += ["", text, "", "## Targets", "", targets_table(goals), ""]
    out.append(
        "seconds: durable (saves) or until every page was read (loads); GB/s: the state's logical bytes over "
        "that; 'vs' columns are time ratios (below 1.00× is faster); ceilings are rates, applied to each "
        "row's bytes."
    )
    if runner.evict is None:
        out.append(f"\n**{NO_DROP}**")
    print("\n".join(out))
    if args.json:
        doc = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info,
            "elapsed_s": elapsed,
            "cold_loads": runner.cache_method,
            "cache_dropped": runner.evict is not None,
            "page_cache_left_before_cold": runner.cached_at_start,
            "workloads": workloads,
            "ceilings": {"bytes": ceil_bytes, "seconds": ceil},
            "rows": records,
            "targets": goals,
            "samples": [
                {"section": s, "operation": op, "samples": [asdict(x) for x in xs]}
                for (s, op), xs in runner.samples.items()
            ],
        }
        write_json(args.json, doc)
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
