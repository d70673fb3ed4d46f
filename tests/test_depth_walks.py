"""The permutation-walk task (melt_kernels.train.walks): sequences read back as text and replayed by plain Python
(every target the state its moves reach, every difficulty the moves made), the generators (permutations, drawn
from the seed, not all commuting), determinism by seed, and bad settings refused."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from melt_kernels.train import IGNORE
from melt_kernels.train.walks import PermutationWalks

tasks = st.builds(PermutationWalks, states=st.integers(3, 9), generators=st.integers(2, 5), steps=st.integers(1, 14),
                  walks=st.integers(1, 4), seed=st.integers(0, 2 ** 31))


@settings(deadline=None)
@given(task=tasks, seed=st.integers(0, 2 ** 32 - 1))
def test_targets_and_difficulties_replay_in_plain_python(task, seed):
    table = task.table.tolist()
    ids, targets, moves = task.sample_with_hops(3, torch.Generator().manual_seed(seed))
    assert ids.shape == targets.shape == moves.shape == (3, task.seq_len)
    assert int(ids.min()) >= 0 and int(ids.max()) < task.vocab_size
    for row in range(3):
        walks = task.render(ids[row], targets[row]).split(" | ")
        assert len(walks) == task.walks
        position = 0
        for walk in walks:
            start, *steps = walk.split()
            state = int(start.removeprefix("x="))
            assert int(targets[row, position]) == IGNORE and int(moves[row, position]) == 0
            assert len(steps) == task.steps
            for made, step in enumerate(steps, 1):
                position += 1
                move, shown = step.removeprefix("g").split(">")
                state = table[int(move)][state]
                assert int(shown) == state == int(targets[row, position])
                assert int(moves[row, position]) == made
            position += 1
    # As served: the prompt ends with the last walk's start; its moves follow.
    assert (targets[:, task.prompt - 1] == IGNORE).all() and (moves[:, task.prompt:] > 0).all()


@given(task=tasks)
def test_generators_are_permutations_from_the_seed_that_do_not_all_commute(task):
    table = task.table.tolist()
    assert len(table) == task.generators and all(sorted(row) == list(range(task.states)) for row in table)
    assert task.table.tolist() == table
    assert any([a[i] for i in b] != [b[i] for i in a] for a in table for b in table)


def test_same_seed_same_sequences_other_seed_others():
    task = PermutationWalks()
    a = task.sample_with_hops(8, torch.Generator().manual_seed(3))
    b = task.sample_with_hops(8, torch.Generator().manual_seed(3))
    c = task.sample_with_hops(8, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    ids, targets = task.sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(ids, a[0]) and torch.equal(targets, a[1])
    assert not torch.equal(PermutationWalks(seed=1).table, task.table)


def test_render():
    task = PermutationWalks(states=3, generators=2, steps=2, walks=2)
    ids = torch.tensor([2, 3, 4, 0, 4, 4])
    assert task.render(ids) == "x=2 g0 g1 | x=0 g1 g1"
    assert task.render(ids, torch.tensor([IGNORE, 1, 0, IGNORE, 2, 1])) == "x=2 g0>1 g1>0 | x=0 g1>2 g1>1"


@pytest.mark.parametrize("changes, word", [
    (dict(states=2), "states"), (dict(generators=1), "generators"), (dict(steps=0), "steps"),
    (dict(walks=0), "walks"), (dict(steps=2.5), "steps"), (dict(seed="a"), "seed")])
def test_bad_settings_name_the_argument(changes, word):
    with pytest.raises(ValueError, match=word):
        PermutationWalks(**changes)
