"""The variable-chains task (melt_kernels.train.chains): its sequences read back as text and checked by an
independent resolver (answers, hop labels, the structure the docstring promises), determinism by seed, bad
settings refused; and the per-difficulty accuracy of melt_kernels.train.evaluate against a model that answers from
the context (100%), one that answers wrong (0%), one that can do one hop, and a real model's own argmax."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from melt_kernels.model import LoopedLM, LoopedLMConfig, LoopOutput
from melt_kernels.train import IGNORE, evaluate
from melt_kernels.train.chains import VariableChains

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def tasks(draw):
    values = draw(st.integers(2, 12))
    queries = draw(st.integers(1, min(values, 7)))
    max_hops = draw(st.integers(queries + 1, 9))
    # The deepest query chains and a variable for each value no deep query ends in: the fewest variables that fit.
    deepest = VariableChains(values=values, names=99, variables=99, queries=queries, max_hops=max_hops).hop_groups
    needed = sum(group[-1] for group in deepest) + values - queries
    variables = draw(st.integers(needed, needed + 6))
    names = draw(st.integers(variables, variables + 8))
    return VariableChains(values=values, names=names, variables=variables, queries=queries, max_hops=max_hops,
                          definition_tokens=draw(st.sampled_from([1, 2, 3])))


def parse(text: str):
    """(definitions {name: right-hand side}, [(query name, its value)]) read from render()'s text."""
    defs_text, _, query_text = text.partition(" | ")
    defs = {}
    for item in defs_text.split():
        name, value = item.split("=")
        assert name not in defs, f"{name} is set twice"
        defs[name] = value
    return defs, [re.fullmatch(r"(\w+)\?(\d+)", q).groups() for q in query_text.split()]


def chain(defs: dict, name: str) -> list[str]:
    """The variables from ``name`` to the one set to a value, following the assignments."""
    path = [name]
    while not defs[path[-1]].isdigit():
        assert defs[path[-1]] in defs and defs[path[-1]] not in path, f"{path[-1]} is undefined or on a cycle"
        path.append(defs[path[-1]])
    return path


@settings(deadline=None)
@given(task=tasks(), seed=st.integers(0, 2 ** 32 - 1))
def test_answers_and_hops_agree_with_an_independent_resolver(task, seed):
    ids, targets, hops = task.sample_with_hops(3, torch.Generator().manual_seed(seed))
    assert ids.shape == targets.shape == hops.shape == (3, task.seq_len)
    assert int(ids.max()) < task.vocab_size and int(ids.min()) >= 0
    for row in range(3):
        defs, queries = parse(task.render(ids[row], targets[row]))
        assert len(defs) == task.variables and len(queries) == task.seq_len - task.prompt == task.asked
        set_to_values = [name for name, rhs in defs.items() if rhs.isdigit()]
        assert sorted(int(defs[name]) for name in set_to_values) == list(range(task.values))
        asked = (hops[row] > 0).nonzero()[:, 0].tolist()
        assert asked == list(range(task.prompt, task.seq_len))
        # In the prompt a target only where three-token definitions end: after each right-hand side.
        ends = [i for i in range(task.prompt) if targets[row, i] != IGNORE]
        assert ends == (list(range(1, task.prompt - 1, 3)) if task.definition_tokens == 3 else [])
        assert all(int(targets[row, i]) == int(ids[row, i + 1]) == task.separator + 1 for i in ends)
        deep = []
        for position, (name, value) in zip(asked, queries):
            path = chain(defs, name)
            assert value == defs[path[-1]] and int(hops[row, position]) == len(path)
            if len(path) > 1:
                deep.append(path)
        # Every variable set to a value is asked (1 hop), and `queries` deep ones, one depth from each group of
        # hops 2 .. max_hops (the groups cut them into consecutive runs), on chains no other deep query shares.
        assert sorted(name for name, _ in queries if defs[name].isdigit()) == sorted(set_to_values)
        groups = task.hop_groups
        assert len(groups) == task.queries and [h for g in groups for h in g] == list(range(2, task.max_hops + 1))
        assert len(deep) == task.queries and all(sum(len(p) in g for p in deep) == 1 for g in groups)
        assert all(not set(a) & set(b) for i, a in enumerate(deep) for b in deep[i + 1:])


def test_same_seed_same_sequences_other_seed_others():
    task = VariableChains()
    a = task.sample_with_hops(8, torch.Generator().manual_seed(3))
    b = task.sample_with_hops(8, torch.Generator().manual_seed(3))
    c = task.sample_with_hops(8, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    ids, targets = task.sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(ids, a[0]) and torch.equal(targets, a[1])


def test_every_deep_depth_is_equally_common_when_the_groups_are_equally_long():
    task = VariableChains(values=8, names=40, variables=40, queries=3, max_hops=7)  # groups 2-3, 4-5, 6-7
    _, _, hops = task.sample_with_hops(300, torch.Generator().manual_seed(0))
    counts = torch.bincount(hops[hops > 0], minlength=8)[1:].tolist()
    assert counts[0] == 300 * 8 and sum(counts[1:]) == 900 and min(counts[1:]) > 110, counts  # 150 each


@pytest.mark.parametrize("tokens", [1, 2])
def test_render_shows_definitions_and_queries(tokens):
    task = VariableChains(values=3, names=4, variables=4, queries=1, max_hops=2, definition_tokens=tokens)
    ids = [task.definition(a, b) for a, b in ((3, 0), (4, 3), (5, 1), (6, 2))]
    ids = torch.tensor([t for d in ids for t in d] + [task.separator, 4, 3])
    assert task.render(ids) == "a=0 b=a c=1 d=2 | b? a?"
    assert task.render(ids, torch.tensor([IGNORE] * (len(ids) - 2) + [0, 0])) == "a=0 b=a c=1 d=2 | b?0 a?0"


@pytest.mark.parametrize("changes, word", [
    (dict(values=1), "values"), (dict(queries=0), "queries"), (dict(queries=8, max_hops=8), "max_hops"),
    (dict(variables=40, names=32), "names"), (dict(variables=10), "variables"),
    (dict(values=3, queries=4, max_hops=6, variables=30), "values"), (dict(max_hops=2.5), "max_hops"),
    (dict(definition_tokens=4), "definition_tokens")])
def test_bad_settings_name_the_argument(changes, word):
    with pytest.raises(ValueError, match=word):
        VariableChains(**changes)


# ---------------------------------------------------------------- accuracy per difficulty


class Oracle(nn.Module):
    """A stand-in for a LoopedLM that evaluate() can run: it reads every token it is given (chunk by chunk, as a
    cache would hold them) and answers each query by resolving the assignments it has read, resolving at most
    ``reach`` hops (past that, and always when ``wrong``, it answers a wrong value).  Its "hidden states" are its
    logits and its head the identity; every loop gives the same answer."""

    def __init__(self, task: VariableChains, reach: int = 10 ** 9, wrong: bool = False):
        super().__init__()
        self.task, self.reach, self.wrong = task, reach, wrong
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(1, 1)
        self.lm_head = nn.Identity()
        self.num_loops = 2

    def new_cache(self, kind, batch, length):
        class Read:
            nbytes = 0
            tokens = torch.zeros(batch, 0, dtype=torch.int64)
        return Read()

    def answer(self, tokens: list[int]) -> int:
        """The value of the query that ``tokens`` ends with, or a wrong one past ``reach`` hops."""
        defs = dict(self.task.definitions(tokens[:self.task.prompt - 1]))  # what it has read
        name, hops = tokens[-1], 0
        while name >= self.task.values:
            name, hops = defs[name], hops + 1
        return (name + 1) % self.task.values if self.wrong or hops > self.reach else name

    def prefill(self, ids, cache, chunk_size, return_loops=True):
        logits = torch.zeros(*ids.shape, self.task.vocab_size)
        for i in range(ids.shape[1]):
            cache.tokens = torch.cat([cache.tokens, ids[:, i:i + 1]], dim=1)
            for b in range(ids.shape[0]):
                seen = cache.tokens[b].tolist()
                if len(seen) > self.task.prompt:  # a query
                    logits[b, i, self.answer(seen)] = 1.0
        return logits, LoopOutput(torch.stack([logits] * self.num_loops), torch.zeros(self.num_loops, *ids.shape))


@pytest.mark.parametrize("options", [dict(chunk_size=5), dict(chunk_size=3, prompt="prompt"), dict(chunk_size=1)])
def test_accuracy_per_hop_of_an_oracle_a_wrong_model_and_a_one_hop_model(options):
    task = VariableChains(values=6, names=16, variables=16, queries=3, max_hops=6)
    ids, targets, hops = task.sample_with_hops(16, torch.Generator().manual_seed(0))
    options = {**options, "prompt": task.prompt} if options.get("prompt") else options
    right = evaluate(Oracle(task), "melt", (ids, targets), groups=hops, per_loop=True, **options)
    assert right["acc"] == 1.0 and right["acc_per_group"] == [None] + [1.0] * 6
    assert right["acc_per_group_per_loop"] == [[None] + [1.0] * 6] * 2
    wrong = evaluate(Oracle(task, wrong=True), "melt", (ids, targets), groups=hops, **options)
    assert wrong["acc"] == 0.0 and wrong["acc_per_group"] == [None] + [0.0] * 6
    one_hop = evaluate(Oracle(task, reach=1), "melt", (ids, targets), groups=hops, **options)
    assert one_hop["acc_per_group"] == [None, 1.0] + [0.0] * 5


def test_accuracy_per_group_is_the_argmax_of_a_real_model():
    task = VariableChains(values=4, names=10, variables=9, queries=2, max_hops=4)
    ids, targets, hops = task.sample_with_hops(6, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    config = LoopedLMConfig(vocab_size=task.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, total_ut_steps=2, max_position_embeddings=64)
    model = LoopedLM(config, backend="reference")
    got = evaluate(model, "looplm", (ids, targets), 4, groups=hops, per_loop=True)
    with torch.no_grad():
        logits, loops = model.prefill(ids, model.new_cache("looplm", *ids.shape), 4, return_loops=True)
        every = model.lm_head(loops.hidden_states)
    for label in range(1, 5):
        where = hops == label
        want = (logits[where].argmax(-1) == targets[where]).double().mean().item()
        assert got["acc_per_group"][label] == pytest.approx(want)
        for loop in range(2):
            hit = (every[loop][where].argmax(-1) == targets[where]).double().mean().item()
            assert got["acc_per_group_per_loop"][loop][label] == pytest.approx(hit)
    assert got["acc_per_group"][0] is None
    with pytest.raises(ValueError, match="groups"):
        evaluate(model, "looplm", (ids, targets), groups=hops[:, :-1])
