"""``cairn`` subcommands that change a store: ``forget`` (retention by hand), ``gc``, ``pin``, ``unpin``."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from cairn._cli_render import Column, Output, UsageError, human_size
from cairn._info import CheckpointInfo
from cairn._manager import retention_reasons, stored_policy
from cairn._store import Store
from cairn.policies import (
    KeepAny,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepWithin,
    RetentionPolicy,
    parse_duration,
)

__all__ = ["add_manage_commands", "kept_by"]


def kept_by(store: Store, infos: list[CheckpointInfo]) -> list[tuple[str, ...]]:
    """Why each checkpoint is kept, by the policy the manager recorded in the newest checkpoint."""
    return retention_reasons(infos, stored_policy(infos), store.pins(), datetime.now(UTC))


def _policy_from_args(args: argparse.Namespace) -> RetentionPolicy | None:
    policies: list[RetentionPolicy] = []
    if args.keep_last is not None:
        policies.append(KeepLast(args.keep_last))
    for spec in args.keep_best or ():
        metric, _, rest = spec.partition(":")
        mode, _, n = rest.partition(":")
        try:
            policies.append(KeepBest(metric, mode=mode or "min", n=int(n) if n else 1))
        except ValueError as e:
            raise UsageError(f"--keep-best {spec}: {e} (use METRIC[:min|max[:N]])") from None
    if args.keep_every_steps is not None:
        policies.append(KeepEvery(steps=args.keep_every_steps))
    if args.keep_every_hours is not None:
        policies.append(KeepEvery(hours=args.keep_every_hours))
    if args.keep_within is not None:
        try:
            policies.append(KeepWithin(parse_duration(args.keep_within)))
        except ValueError as e:
            raise UsageError(f"--keep-within {args.keep_within}: {e}") from None
    if not policies:
        return None
    return policies[0] if len(policies) == 1 else KeepAny(tuple(policies))


def cmd_forget(args: argparse.Namespace, out: Output, store: Store) -> int:
    """Apply a retention policy by hand: delete the checkpoints it does not keep (manifests only)."""
    infos = store.list()
    policy = _policy_from_args(args) or stored_policy(infos)
    if policy is None:
        raise UsageError(
            "no retention policy: give at least one --keep-* option (the store records none of its own)"
        )
    reasons = retention_reasons(infos, policy, store.pins(), datetime.now(UTC))
    doomed = [i for i, why in zip(infos, reasons, strict=True) if not why]
    if not args.dry_run:
        for info in doomed:
            store.delete(info.name)
    if args.json:
        out.json(
            {
                "store": store.url,
                "dry_run": args.dry_run,
                "policy": policy.to_spec(),
                "checkpoints": [
                    {"name": i.name, "step": i.step, "keep": bool(why), "reasons": list(why)}
                    for i, why in zip(infos, reasons, strict=True)
                ],
            }
        )
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    rows = [
        [i.name, str(i.step), "keep" if why else verb, ", ".join(why) or "-"]
        for i, why in zip(infos, reasons, strict=True)
    ]
    styles = [None if why else "red" for why in reasons]
    out.table([Column("NAME"), Column("STEP", right=True), Column("ACTION"), Column("KEPT BY")], rows, styles)
    out.line()
    tail = " (dry run: nothing deleted)" if args.dry_run else "; run `cairn gc` to reclaim their space"
    out.line(f"{verb} {len(doomed)} of {len(infos)} checkpoints{tail}")
    return 0


def cmd_gc(args: argparse.Namespace, out: Output, store: Store) -> int:
    """Delete unreferenced blobs and crash leftovers; report what was freed."""
    try:
        grace = parse_duration(args.grace)
    except ValueError as e:
        raise UsageError(f"--grace {args.grace}: {e}") from None
    report = store.gc(grace=grace, dry_run=args.dry_run)
    if args.json:
        doc: dict[str, Any] = {
            "store": store.url,
            **{k: v for k, v in vars(report).items() if k != "deleted"},
        }
        out.json(doc)
        return 0
    verb = "would free" if args.dry_run else "freed"
    out.line(
        f"{verb} {human_size(report.bytes_freed)} in {report.blobs_deleted} unreferenced blobs; "
        f"kept {report.blobs_kept} blobs ({human_size(report.bytes_kept)}) that checkpoints use"
    )
    if report.blobs_spared:
        out.line(
            f"spared {report.blobs_spared} unreferenced blobs younger than the grace period ({args.grace})"
        )
    if report.temp_deleted:
        out.line(f"removed {report.temp_deleted} temporary files left by interrupted saves")
    return 0


def cmd_pin(args: argparse.Namespace, out: Output, store: Store, name: str) -> int:
    """Pin (or, for ``unpin``, unpin) one checkpoint."""
    pinned = args.command == "pin"
    if pinned:
        store.pin(name)
    else:
        store.unpin(name)
    if args.json:
        out.json({"store": store.url, "checkpoint": name, "pinned": pinned})
    elif pinned:
        out.line(f"pinned {name}: retention will never delete it")
    else:
        out.line(f"unpinned {name}")
    return 0


def add_manage_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``forget``, ``gc``, ``pin`` and ``unpin`` on the ``cairn`` parser's subparsers."""
    forget = sub.add_parser(
        "forget",
        parents=[common],
        help="delete the checkpoints a retention policy does not keep (newest and pinned always kept)",
    )
    forget.add_argument("path", metavar="PATH", help="the store directory")
    forget.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest")
    forget.add_argument(
        "--keep-best", action="append", metavar="METRIC[:MODE[:N]]", help="keep the N best (mode min|max)"
    )
    forget.add_argument("--keep-every-steps", type=int, metavar="N", help="keep one per N steps")
    forget.add_argument("--keep-every-hours", type=float, metavar="H", help="keep one per H hours")
    forget.add_argument("--keep-within", metavar="DURATION", help="keep all newer than this (90m, 6h, 2d)")
    forget.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    forget.set_defaults(store_command=cmd_forget)

    gc = sub.add_parser("gc", parents=[common], help="reclaim the space of blobs no checkpoint uses")
    gc.add_argument("path", metavar="PATH", help="the store directory")
    gc.add_argument("--grace", default="15m", metavar="DURATION", help="spare younger blobs (default 15m)")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be freed")
    gc.set_defaults(store_command=cmd_gc)

    for verb, text in (("pin", "keep a checkpoint forever"), ("unpin", "let retention decide again")):
        p = sub.add_parser(verb, parents=[common], help=text)
        p.add_argument("ref", metavar="PATH@NAME", help="the store and the checkpoint")
        p.set_defaults(pin_command=cmd_pin)
