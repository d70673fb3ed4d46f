"""A task that needs depth (the depth claim's first candidate): chains of variable assignments, from a seed.

A sequence assigns ``variables`` distinct variables, one definition each, in
a random order, then asks for the values of some of them::

    c=b  a=3  x=7  b=a  y=x  ...  |  a?  y?  c?  x?  ...        answers: 3 7 3 7

A variable is set to a value (``0 .. values-1``) or to a variable made before
it; a variable set to a value resolves in 1 hop, one set to a variable of
``h`` hops in ``h + 1``: the number of look-ups its answer needs, which is a
query's difficulty.  A transformer does one look-up per attention layer at
the query's position, so an answer of ``h`` hops needs ``h`` layers applied in
sequence: a looped model gets them by looping, a standard one only from its
depth (the setting of "Reasoning with Latent Thoughts: On the Power of Looped
Transformers", arXiv 2502.17416).

Tokens: values ``0 .. values-1``, names ``values .. values+names-1``, the
separator ``values+names``; a definition is (``definition_tokens``) one
token per (name, what it is set to) pair (1, the default: a look-up is one
attention read), the name then what it is set to (2: a look-up first needs a
layer that puts each name beside its right-hand side), or those two and an
end token ``values+names+1`` that is the target after the right-hand side
(3: a next-token target that rewards reading the token before).  A query is
its name; the model answers at the query's own position (its target is the
value; the next token is the next query, never an answer, so no answer is
ever read by a later query).  docs/depth.md has what small models learned of
each: the one-token format taught one hop in a few hundred steps, composing
two hops in none of the budgets tried, which is why the depth claim runs on
:mod:`melt_kernels.train.walks`.

What a sequence asks, every value being set to exactly one variable (so which
values occur says nothing about an answer, and a guess is right 1 time in
``values``):

* every one of those ``values`` variables (1 hop each): the look-ups a model
  learns to read an assignment from;
* ``queries`` deep ones, each at the end of a chain of its own (no other
  query runs through it) whose depth is drawn from its own group of hops
  ``2 .. max_hops`` (split into ``queries`` consecutive groups), so the
  depths are equally common when the groups are equally long.

The other variables are distractors set to a random earlier-made variable
(trees that may hang off the chains without changing their depths).
Variable names are a random choice of ``variables`` of the ``names`` name
tokens per sequence, so the model must read the assignments, not remember
them.  The prompt, as served, is the definitions and the separator
(:attr:`VariableChains.prompt`); the queries after it are decoded one token
at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from melt_kernels.train.data import IGNORE, Batch


@dataclass(frozen=True)
class VariableChains:
    """The variable-resolution task (module docstring) as a training source: :meth:`sample` draws (ids,
    targets), :meth:`sample_with_hops` also the depth of every answer."""

    values: int = 8
    names: int = 32
    variables: int = 24
    queries: int = 3
    max_hops: int = 8
    definition_tokens: int = 1

    def __post_init__(self):
        if self.definition_tokens not in (1, 2, 3) or isinstance(self.definition_tokens, bool):
            raise ValueError(f"definition_tokens must be 1, 2 or 3, got {self.definition_tokens!r}")
        for name in ("values", "names", "variables", "queries", "max_hops"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.values < 2:
            raise ValueError(f"values must be at least 2 (one value is no question), got {self.values}")
        if self.queries > self.max_hops - 1:
            raise ValueError(f"queries ({self.queries}) must be below max_hops ({self.max_hops}): each deep query "
                             "draws its depth from its own group of hops 2 .. max_hops")
        if self.queries > self.values:
            raise ValueError(f"queries ({self.queries}) must not exceed values ({self.values}): each deep query's "
                             "chain ends in a value of its own")
        if self.variables > self.names:
            raise ValueError(f"variables ({self.variables}) must not exceed names ({self.names}): each variable "
                             "of a sequence has its own name")
        needed = sum(group[-1] for group in self.hop_groups) + self.values - self.queries
        if needed > self.variables:
            raise ValueError(f"variables ({self.variables}) must hold the deepest query chains and a variable set "
                             f"to each other value ({needed} for queries={self.queries}, max_hops={self.max_hops}, "
                             f"values={self.values})")

    @property
    def vocab_size(self) -> int:
        return self.separator + 1 + (self.names * (self.values + self.names) if self.definition_tokens == 1 else
                                     1 if self.definition_tokens == 3 else 0)

    @property
    def separator(self) -> int:
        return self.values + self.names

    @property
    def prompt(self) -> int:
        """Tokens before the first query: the definitions and the separator."""
        return self.definition_tokens * self.variables + 1

    @property
    def asked(self) -> int:
        """Queries a sequence: one per value (1 hop) and the deep ones."""
        return self.values + self.queries

    @property
    def seq_len(self) -> int:
        return self.prompt + self.asked

    @property
    def chance(self) -> float:
        """The accuracy of a uniform guess among the values."""
        return 1 / self.values

    @property
    def hop_groups(self) -> list[range]:
        """The ``queries`` consecutive groups of hops ``2 .. max_hops`` the deep queries draw their depths from."""
        cuts = [round(i * (self.max_hops - 1) / self.queries) for i in range(self.queries + 1)]
        return [range(cuts[i] + 2, cuts[i + 1] + 2) for i in range(self.queries)]

    def definition(self, name: int, rhs: int) -> list[int]:
        """The tokens of ``name = rhs`` (name and rhs as tokens: rhs a value or a name)."""
        if self.definition_tokens == 2:
            return [name, rhs]
        if self.definition_tokens == 3:
            return [name, rhs, self.separator + 1]
        return [self.separator + 1 + (name - self.values) * (self.values + self.names) + rhs]

    def definition_targets(self) -> list[int]:
        """The targets of a definition's tokens: with three tokens, the end of the definition after its
        right-hand side (a next-token target that rewards reading the token before: the name or not)."""
        return [IGNORE, self.separator + 1, IGNORE] if self.definition_tokens == 3 else \
            [IGNORE] * self.definition_tokens

    def definitions(self, tokens: list[int]) -> list[tuple[int, int]]:
        """The (name, rhs) pairs of a sequence's definition tokens (:meth:`definition` read back)."""
        if self.definition_tokens > 1:
            return list(zip(tokens[0::self.definition_tokens], tokens[1::self.definition_tokens]))
        width = self.values + self.names
        return [(self.values + (t - self.separator - 1) // width, (t - self.separator - 1) % width) for t in tokens]

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        """(ids, targets), both (batch, seq_len) int64, drawn on the CPU from ``generator``."""
        ids, targets, _ = self.sample_with_hops(batch, generator)
        return ids, targets

    def sample_with_hops(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        """(ids, targets, hops): hops (batch, seq_len) int64 is each query's depth where targets has an answer,
        0 elsewhere."""
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        rows = [self._sequence(generator) for _ in range(batch)]
        return tuple(torch.tensor([r[i] for r in rows], dtype=torch.int64) for i in range(3))

    def _draw(self, generator: torch.Generator, n: int) -> int:
        return int(torch.randint(n, (), generator=generator))

    def _sequence(self, generator: torch.Generator) -> tuple[list[int], list[int], list[int]]:
        """One sequence's tokens, targets and hops."""
        names = (torch.randperm(self.names, generator=generator)[:self.variables] + self.values).tolist()
        groups = [self.hop_groups[i] for i in torch.randperm(self.queries, generator=generator).tolist()]
        roots = torch.randperm(self.values, generator=generator).tolist()  # each value is set once
        made: list[int] = []  # variables in the order made: a variable is only set to one made before it
        rhs: dict[int, int] = {}
        asked = []  # (name, value, hops)
        for index, value in enumerate(roots):
            # The first `queries` values end the deep chains, one depth from each group; the others are set once.
            depth = groups[index][self._draw(generator, len(groups[index]))] if index < self.queries else 1
            chain = names[len(made):len(made) + depth]
            for i, name in enumerate(chain):
                rhs[name] = value if i == 0 else chain[i - 1]
            made += chain
            asked.append((chain[-1], value, depth))
            if depth > 1:
                asked.append((chain[0], value, 1))
        for name in names[len(made):]:
            rhs[name] = made[self._draw(generator, len(made))]  # a distractor hanging off any earlier variable
            made.append(name)
        tokens = []
        for i in torch.randperm(self.variables, generator=generator).tolist():
            tokens += self.definition(made[i], rhs[made[i]])
        tokens.append(self.separator)
        targets = self.definition_targets() * self.variables + [IGNORE]
        hops = [0] * len(tokens)
        for i in torch.randperm(len(asked), generator=generator).tolist():
            name, value, depth = asked[i]
            tokens.append(name)
            targets.append(value)
            hops.append(depth)
        return tokens, targets, hops

    def render(self, ids: torch.Tensor, targets: Optional[torch.Tensor] = None) -> str:
        """A sequence as text: values as numbers, names as ``a``, ``b``, ... (``n26``, ``n27``, ... past z), the
        separator as ``|``; definitions ``x=y``, queries ``x?`` (``x?3`` with ``targets``)."""
        def word(token: int) -> str:
            if token < self.values:
                return str(token)
            if token == self.separator:
                return "|"
            name = token - self.values
            return chr(ord("a") + name) if name < 26 else f"n{name}"

        tokens = [int(t) for t in ids]
        cut = tokens.index(self.separator) if self.separator in tokens else len(tokens)
        text = " ".join(f"{word(a)}={word(b)}" for a, b in self.definitions(tokens[:cut]))
        if cut == len(tokens):
            return text
        answers = [""] * len(tokens) if targets is None else \
            [word(int(t)) if t != IGNORE else "" for t in targets]
        return text + " | " + " ".join(f"{word(tokens[i])}?{answers[i]}" for i in range(cut + 1, len(tokens)))
