"""The vLLM plugin on vLLM's CPU build: greedy tokens are LoopedLM.generate's, whatever the batch and the budget.

One engine per checkpoint (MELT with each gate, and with Ouro's exit rule; Ouro), float32, eager, with a token budget of 16 per step,
so that Ouro's longer prompts are cut into chunks and MELT's prompts (served whole, never cut) share steps
with other requests' decoding.  Skipped without vLLM (its own venv: .ci/vllm.sh).
"""
import os

import pytest

vllm = pytest.importorskip("vllm")

from vllm_checkpoints import KINDS, package_tokens, write_folder  # noqa: E402

NEW = 6
MAX_MODEL_LEN = 64
BUDGET = 16
SHARED = list(range(1, 33))  # a 32-token prefix two prompts share: prefix caching may serve it (Ouro)
PROMPTS = [[5, 3, 9, 1, 2], list(range(7, 30)), [(3 * i) % 40 for i in range(40)], [11] * 11,
           SHARED + [4, 4], SHARED + [8, 9, 10]]


@pytest.fixture(scope="module", params=KINDS)
def served(request, tmp_path_factory):
    """(kind, checkpoint folder, the engine serving it)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    path = write_folder(tmp_path_factory.mktemp(request.param), request.param)
    llm = vllm.LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True, seed=0,
                   max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=BUDGET, max_num_seqs=4)
    yield request.param, path, llm
    llm.llm_engine.engine_core.shutdown()


def greedy(llm, prompts):
    params = vllm.SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_batch_generates_each_prompt_as_the_package_does_alone(served):
    """A batch of prompts of different lengths, scheduled by the engine's budget: each row's tokens are
    LoopedLM.generate's for its prompt alone (Ouro on its LoopLM cache; MELT on its cache, prompt whole)."""
    kind, path, llm = served
    want = [package_tokens(path, p, NEW) for p in PROMPTS]
    assert greedy(llm, PROMPTS) == want


def test_prefill_policy_and_a_prompt_alone_or_among_others(served):
    """MELT: chunked prefill and prefix caching off, the budget raised to max_model_len (a prompt is one
    chunk); Ouro keeps both and the budget of 16, so its 40-token prompt is cut.  Alone or among others,
    a prompt gives the same tokens."""
    kind, _, llm = served
    config = llm.llm_engine.vllm_config
    melt = kind != "ouro"
    assert config.scheduler_config.enable_chunked_prefill is not melt
    assert config.cache_config.enable_prefix_caching is not melt
    assert config.scheduler_config.max_num_batched_tokens == (MAX_MODEL_LEN if melt else BUDGET)
    longest = PROMPTS[2]
    among = greedy(llm, PROMPTS)[2]
    assert greedy(llm, [longest]) == [among]
