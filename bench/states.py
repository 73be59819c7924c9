"""The states the store benchmark saves and loads: GPT-2 small + AdamW, GPT-2 medium, a fine-tune, an
embedding table.

A state is a flat dict of float32 tensors whose keys name their place in the nested state with ``/``
(``model/transformer.h.0.ln_1.weight``, ``optim/exp_avg/...``); :func:`nest` turns it into the nested dict
that cairn and ``torch.save`` get, safetensors and DCP take the flat dict. Data is seeded
``torch.randn``: incompressible and identical between runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Shape = tuple[int, ...]
Flat = dict[str, torch.Tensor]

GPT2_SMALL = {"n_layer": 12, "d": 768}
GPT2_MEDIUM = {"n_layer": 24, "d": 1024}
VOCAB, N_CTX = 50257, 1024
TRAINABLE = 0.10  # fine-tune: the fraction of parameters that train
CHANGED_ROWS = 0.01  # embedding: the fraction of rows that change between saves


@dataclass
class Pair:
    """Two consecutive checkpoints of one run: ``second`` differs from ``first`` by ``changed_bytes``."""

    label: str
    first: Flat
    second: Flat
    changed_bytes: int


@dataclass
class Workload:
    """A state and what is measured on it.

    ``full``: loads and lazy reads are measured too (otherwise saves only). ``pairs``: the first save of
    each is a full save (for every system), the second shows what an incremental save costs.
    """

    name: str
    description: str
    pairs: list[Pair]
    full: bool
    lazy_key: str

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.pairs[0].first.values())


def gpt2_shapes(n_layer: int, d: int, vocab: int, n_ctx: int) -> list[tuple[str, Shape]]:
    """GPT-2 with Hugging Face names and Conv1D layouts (the LM head is tied to ``wte``)."""
    out: list[tuple[str, Shape]] = [
        ("transformer.wte.weight", (vocab, d)),
        ("transformer.wpe.weight", (n_ctx, d)),
    ]
    for i in range(n_layer):
        h = f"transformer.h.{i}"
        out += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (d, 3 * d)),
            (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)),
            (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (d, 4 * d)),
            (f"{h}.mlp.c_fc.bias", (4 * d,)),
            (f"{h}.mlp.c_proj.weight", (4 * d, d)),
            (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    return [*out, ("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def scaled_gpt2(n_layer: int, d: int, f: float) -> list[tuple[str, Shape]]:
    """GPT-2 shapes shrunk by about ``f`` (<= 1) in bytes: fewer blocks and vocabulary rows, and below one
    block's worth a narrower model. Only for smoke runs."""
    if f >= 1:
        return gpt2_shapes(n_layer, d, VOCAB, N_CTX)
    if f * n_layer < 1:
        d = max(64, 64 * int(d * math.sqrt(f * n_layer) / 64))
    return gpt2_shapes(max(1, round(n_layer * f)), d, max(256, round(VOCAB * f)), max(64, round(N_CTX * f)))


def nbytes(shapes: list[tuple[str, Shape]]) -> int:
    """float32 bytes of ``shapes``."""
    return 4 * sum(math.prod(s) for _, s in shapes)


class Filler:
    """Seeded random tensors, scaled like model weights or Adam moments."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, shape: Shape, kind: str = "param") -> torch.Tensor:
        t = torch.randn(shape, generator=self.gen)
        if kind == "param":
            return t.mul_(0.02)
        if kind == "exp_avg":
            return t.mul_(1e-3)
        return t.square_().mul_(1e-6)  # exp_avg_sq


def nest(flat: Flat) -> dict[str, Any]:
    """The nested state: each ``/`` in a key is one level of dicts."""
    out: dict[str, Any] = {}
    for key, t in flat.items():
        *groups, leaf = key.split("/")
        node = out
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = t
    return out


def dotted(key: str) -> str:
    """The dotted path cairn gives a flat key (``model/a.b`` -> ``model.a.b``)."""
    return key.replace("/", ".")


def changed(t: torch.Tensor) -> torch.Tensor:
    """A new tensor with every element different from ``t``'s (one small optimizer-like step)."""
    return t + 1e-3


def scale_of(natural: int, size_gb: float | None) -> float:
    """How much to shrink a state of ``natural`` bytes to reach ``size_gb`` (never grows)."""
    return 1.0 if size_gb is None else min(1.0, size_gb * 1e9 / natural)


def small(seed: int, size_gb: float | None) -> Workload:
    """GPT-2 small + AdamW ``exp_avg``/``exp_avg_sq`` + the step: 445 tensors, 1.49 GB."""
    shapes = scaled_gpt2(
        **GPT2_SMALL, f=scale_of(3 * nbytes(gpt2_shapes(**GPT2_SMALL, vocab=VOCAB, n_ctx=N_CTX)), size_gb)
    )
    fill = Filler(seed)
    flat: Flat = {f"model/{k}": fill(s) for k, s in shapes}
    for moment in ("exp_avg", "exp_avg_sq"):
        flat.update({f"optim/{moment}/{k}": fill(s, moment) for k, s in shapes})
    flat["optim/step"] = torch.tensor(1000.0)
    return Workload(
        "small",
        "GPT-2 small (HF names) + AdamW exp_avg and exp_avg_sq + step",
        [Pair("unchanged", flat, flat, 0)],
        full=True,
        lazy_key=middle_key(flat, "mlp.c_fc.weight"),
    )


def medium(seed: int, size_gb: float | None) -> Workload:
    """GPT-2 medium model weights: 292 tensors, 1.42 GB."""
    natural = nbytes(gpt2_shapes(**GPT2_MEDIUM, vocab=VOCAB, n_ctx=N_CTX))
    fill = Filler(seed + 1)
    flat: Flat = {f"model/{k}": fill(s) for k, s in scaled_gpt2(**GPT2_MEDIUM, f=scale_of(natural, size_gb))}
    return Workload(
        "medium",
        "GPT-2 medium model weights (HF names)",
        [Pair("unchanged", flat, flat, 0)],
        full=True,
        lazy_key=middle_key(flat, "mlp.c_fc.weight"),
    )


def middle_key(flat: Flat, suffix: str) -> str:
    """The key ending in ``suffix`` in the middle of the state (the tensor lazy reads fetch)."""
    keys = [k for k in flat if k.startswith("model/") and k.endswith(suffix)]
    return keys[len(keys) // 2]


def finetune(seed: int, size_gb: float | None) -> Workload:
    """GPT-2 medium with the last tensors (about 10% of the parameters) trainable, the rest frozen.

    Pair "weights only": the model state dict before and after training steps. Pair "weights + AdamW":
    the same plus ``exp_avg``/``exp_avg_sq`` of the trainable parameters (an optimizer only holds
    moments for those), all of which change too.
    """
    natural = nbytes(gpt2_shapes(**GPT2_MEDIUM, vocab=VOCAB, n_ctx=N_CTX))
    shapes = scaled_gpt2(**GPT2_MEDIUM, f=scale_of(natural, size_gb))
    fill = Filler(seed + 2)
    model: Flat = {f"model/{k}": fill(s) for k, s in shapes}
    total = sum(t.numel() for t in model.values())
    trainable: list[str] = []
    for key in reversed(model):  # from ln_f backwards through the last blocks
        if sum(model[k].numel() for k in trainable) >= TRAINABLE * total:
            break
        trainable.append(key)
    model2 = {k: changed(t) if k in trainable else t for k, t in model.items()}
    moments = {
        f"optim/{m}/{k.split('/', 1)[1]}": fill(model[k].shape, m)
        for m in ("exp_avg", "exp_avg_sq")
        for k in trainable
    }
    moments2 = {k: changed(t) for k, t in moments.items()}
    share = sum(model[k].numel() for k in trainable) / total
    weights_changed = sum(model[k].nbytes for k in trainable)
    moments_bytes = sum(t.nbytes for t in moments.values())
    return Workload(
        "finetune",
        f"GPT-2 medium, {len(trainable)} trainable tensors ({share:.1%} of parameters), the rest frozen",
        [
            Pair("weights only", model, model2, weights_changed),
            Pair(
                "weights + AdamW moments (trainable params)",
                {**model, **moments, "optim/step": torch.tensor(100.0)},
                {**model2, **moments2, "optim/step": torch.tensor(120.0)},
                weights_changed + moments_bytes + 4,
            ),
        ],
        full=False,
        lazy_key=trainable[0],
    )


def embedding(seed: int, size_gb: float | None) -> Workload:
    """A 50257×1024 embedding table and a small dense model; 1% of the rows change between saves, and
    the whole dense model (as it would with sparse embedding updates).

    Pair "1% rows scattered": rows drawn at random (seeded). Pair "1% rows contiguous": one run of rows
    (new tokens appended, or a hot range).
    """
    rows, dim, hidden = VOCAB, 1024, 4096
    natural = 4 * (rows * dim + 2 * dim * hidden + dim + hidden)
    f = scale_of(natural, size_gb)
    rows, dim, hidden = max(256, round(rows * f)), max(64, 64 * round(dim * math.sqrt(f) / 64)), hidden
    fill = Filler(seed + 3)
    first: Flat = {
        "embedding/weight": fill((rows, dim)),
        "model/fc1.weight": fill((hidden, dim)),
        "model/fc1.bias": fill((hidden,)),
        "model/fc2.weight": fill((dim, hidden)),
        "model/fc2.bias": fill((dim,)),
    }
    n = max(1, round(CHANGED_ROWS * rows))
    picks: dict[str, list[int]] = {
        "1% of rows scattered": sorted(random.Random(seed).sample(range(rows), n)),
        "1% of rows contiguous": list(range(rows // 2, rows // 2 + n)),
    }
    dense = {k: changed(t) for k, t in first.items() if k.startswith("model/")}
    dense_bytes = sum(t.nbytes for t in dense.values())
    pairs = []
    for label, idx in picks.items():
        table = first["embedding/weight"].clone()
        table[idx] = changed(table[idx])
        pairs.append(Pair(label, first, {"embedding/weight": table, **dense}, n * dim * 4 + dense_bytes))
    return Workload(
        "embedding",
        f"{rows}×{dim} embedding table + a {dim}→{hidden}→{dim} MLP; "
        f"{n} rows ({CHANGED_ROWS:.0%}) and the MLP change between saves",
        pairs,
        full=False,
        lazy_key="embedding/weight",
    )


BUILDERS: dict[str, Callable[[int, float | None], Workload]] = {
    "small": small,
    "medium": medium,
    "finetune": finetune,
    "embedding": embedding,
}


def describe(flat: Flat) -> str:
    """Tensor count and size of a flat state."""
    return f"{len(flat)} tensors, {sum(t.nbytes for t in flat.values()) / 1e9:.3f} GB"
