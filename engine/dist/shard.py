"""Which part of each weight a tensor-parallel rank holds (Megatron-LM's split of a LLaMA block).

q/k/v and gate/up are split by output rows (column-parallel): rank r of N holds query heads
[r H/N, (r+1) H/N), KV heads [r Hkv/N, (r+1) Hkv/N) (the KV heads of exactly those query heads: GQA
groups stay whole) and that slice of the SwiGLU's hidden units. wo and w2 are split by input columns
(row-parallel): each rank's product is a partial sum of the block's output, summed over the ranks once
per sublayer. Norms and the embedding are replicated; the output head is split by vocabulary rows
(the logits are gathered) where the vocabulary divides evenly, else replicated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ModelArgs

COLUMN_PARALLEL = {"attention.wq.weight": "q", "attention.wk.weight": "kv", "attention.wv.weight": "kv",
                   "feed_forward.w1.weight": "hidden", "feed_forward.w3.weight": "hidden"}
ROW_PARALLEL = {"attention.wo.weight": "q", "feed_forward.w2.weight": "hidden"}


class ShardError(ValueError):
    """A model that cannot be split over this many ranks."""


@dataclass(frozen=True)
class Cut:
    """Rows (axis 0) or columns (axis 1) [start, stop) of a weight [out, in]."""

    axis: int
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size` tensor-parallel ranks; `split_vocab`: the output head split by vocabulary rows."""

    rank: int
    size: int
    split_vocab: bool = True

    def check(self, args: ModelArgs) -> None:
        """One line naming what does not divide by the number of ranks, and the sizes that would work."""
        sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "hidden_dim": args.hidden_dim}
        bad = [f"{k} {v}" for k, v in sizes.items() if v % self.size]
        if bad:
            ok = [n for n in range(1, args.n_kv_heads + 1) if all(v % n == 0 for v in sizes.values())]
            raise ShardError(f"cannot split the model over {self.size} tensor-parallel ranks: {', '.join(bad)} "
                             f"not divisible by {self.size} (whole heads per rank; sizes that divide: "
                             f"{', '.join(map(str, ok))})")

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The shapes this rank's modules and KV store have: its heads, KV heads and hidden units."""
        self.check(args)
        n = self.size
        return dataclasses.replace(args, n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                                   hidden_dim=args.hidden_dim // n, head_dim=args.head_dim)

    def splits_vocab(self, args: ModelArgs) -> bool:
        return self.split_vocab and args.vocab_size % self.size == 0

    def vocab_cut(self, args: ModelArgs) -> Cut | None:
        """This rank's rows of the output head, or None where the head is replicated."""
        if not self.splits_vocab(args):
            return None
        rows = args.vocab_size // self.size
        return Cut(0, self.rank * rows, (self.rank + 1) * rows)

    def cut(self, name: str, args: ModelArgs) -> Cut | None:
        """The part of the internal weight `name` this rank reads (None: all of it)."""
        if name == "output.weight":
            return self.vocab_cut(args)
        kind = name.split(".", 2)[-1] if name.startswith("layers.") else name
        width = {"q": args.n_heads * args.head_dim, "kv": args.n_kv_heads * args.head_dim,
                 "hidden": args.hidden_dim}
        for table, axis in ((COLUMN_PARALLEL, 0), (ROW_PARALLEL, 1)):
            if kind in table:
                each = width[table[kind]] // self.size
                return Cut(axis, self.rank * each, (self.rank + 1) * each)
        return None

    def shape(self, name: str, args: ModelArgs, full: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's part of `name`, whose whole shape is `full`."""
        cut = self.cut(name, args)
        if cut is None:
            return full
        out = list(full)
        out[cut.axis] = cut.stop - cut.start
        return tuple(out)
