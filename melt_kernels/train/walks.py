"""A task that needs depth: walks of a state under a sequence of permutations, generated offline from a seed.

A fixed set of ``generators`` random permutations of ``states`` states (drawn
once from the task's ``seed``: the model learns them) moves a state; a walk
is a start state followed by ``steps`` generator tokens, and after each of
them the model names the state reached::

    x=3  g1 g0 g2 g2 ...        targets:  -  g1(3)  g0(g1(3))  g2(g0(g1(3))) ...

The target after the k-th generator is the state after k moves: its
difficulty is k, the number of permutations composed.  A transformer
computes it along the tokens, each layer carrying the state one or more
moves further (a layer can compose a few moves at once, so a model of L
layers handles a few more than L moves, and then falls to chance): a looped
model gets its layer applications by looping, a standard one only from its
depth (the setting of "Reasoning with Latent Thoughts: On the Power of
Looped Transformers", arXiv 2502.17416).  The generators are redrawn until
they generate a group that is not abelian (for 5 or more states, typically
the whole symmetric group), so that the order of the moves matters and a
count of each generator is no shortcut.  A guess is right 1 time in
``states``.

A sequence holds ``walks`` independent walks.  Tokens: states ``0 ..
states-1``, generators ``states .. states+generators-1``; targets are the
states reached (:data:`~melt_kernels.train.data.IGNORE` at each start).  As
served, the prompt is every walk but the last and the last one's start
(:attr:`PermutationWalks.prompt`); its moves are decoded one token at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from melt_kernels.train.data import IGNORE, Batch


@dataclass(frozen=True)
class PermutationWalks:
    """The permutation-walk task (module docstring) as a training source: :meth:`sample` draws (ids, targets),
    :meth:`sample_with_hops` also each target's difficulty (the moves made, 0 where there is no target)."""

    states: int = 5
    generators: int = 3
    steps: int = 12
    walks: int = 3
    seed: int = 0

    def __post_init__(self):
        for name in ("states", "generators", "steps", "walks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.states < 3 or self.generators < 2:
            raise ValueError(f"need states >= 3 and generators >= 2 for a group that is not abelian, got "
                             f"states={self.states}, generators={self.generators}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def table(self) -> torch.Tensor:
        """(generators, states) int64: row g maps state s to ``table[g, s]``; drawn from ``seed``, redrawn until
        two generators do not commute."""
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            table = torch.stack([torch.randperm(self.states, generator=generator) for _ in range(self.generators)])
            if any(not torch.equal(a[b], b[a]) for a in table for b in table):
                return table

    @property
    def vocab_size(self) -> int:
        return self.states + self.generators

    @property
    def seq_len(self) -> int:
        return self.walks * (1 + self.steps)

    @property
    def prompt(self) -> int:
        """Tokens before the first move of the last walk."""
        return self.seq_len - self.steps

    @property
    def chance(self) -> float:
        """The accuracy of a uniform guess among the states."""
        return 1 / self.states

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        """(ids, targets), both (batch, seq_len) int64, drawn on the CPU from ``generator``."""
        ids, targets, _ = self.sample_with_hops(batch, generator)
        return ids, targets

    def sample_with_hops(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        """(ids, targets, hops): hops (batch, seq_len) int64 is the number of moves made at each target, 0 at
        each start."""
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        table = self.table
        start = torch.randint(self.states, (batch, self.walks, 1), generator=generator)
        moves = torch.randint(self.generators, (batch, self.walks, self.steps), generator=generator)
        reached, state = [], start[..., 0]
        for k in range(self.steps):
            state = table[moves[..., k], state]
            reached.append(state)
        ids = torch.cat([start, moves + self.states], dim=-1).flatten(1)
        targets = torch.cat([torch.full_like(start, IGNORE), torch.stack(reached, dim=-1)], dim=-1).flatten(1)
        made = torch.arange(1 + self.steps).expand(batch, self.walks, -1)
        return ids, targets, made.flatten(1).clone()

    def render(self, ids: torch.Tensor, targets: Optional[torch.Tensor] = None) -> str:
        """A sequence as text: each walk ``x=3 g1 g0 ...`` on its own, `` | `` between walks; with ``targets`` each
        move as ``g1>4`` (the state it reaches)."""
        walks, words = [], []
        for i, token in enumerate(int(t) for t in ids):
            if token < self.states:
                if words:
                    walks.append(" ".join(words))
                words = [f"x={token}"]
                continue
            word = f"g{token - self.states}"
            if targets is not None and int(targets[i]) != IGNORE:
                word += f">{int(targets[i])}"
            words.append(word)
        return " | ".join(walks + [" ".join(words)])
