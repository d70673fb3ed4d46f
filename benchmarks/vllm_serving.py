"""MELT against Ouro served by vLLM (the plugin, melt_kernels.vllm) at one KV budget: capacity and throughput.

For each model (MELT with the paper's latent gate, one KV cache per layer; Ouro, one per loop and layer) and
each loop count T, a tiny random checkpoint (head_dim 64) is served by ``vllm.LLM`` with the same
``kv_cache_memory_bytes``, and the engine reports:

* its KV capacity in tokens (``num_gpu_blocks * block_size``, what the engine allocated) and its maximum
  concurrency, the capacity over ``max_model_len`` (what vLLM logs as "Maximum concurrency"): MELT's does
  not depend on T, Ouro's falls as 1/T;
* tokens per second on a fixed workload: ``--requests`` prompts of random lengths in [16, 256] (one seed)
  generating ``--new-tokens`` greedy tokens each, submitted at once.

    python benchmarks/vllm_serving.py --json results.json --md results.md

Runs where vLLM is installed (its CPU build in .venv-vllm, see .ci/vllm.sh, or a GPU build); eager mode
(no torch.compile) so that each engine starts in seconds.  Throughput on a shared 2-core CPU is noisy and is
the CPU's, not a GPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time

import torch

from melt_kernels import LoopedLM, LoopedLMConfig, kv_bytes_per_token, to_melt

MODELS = ("melt", "ouro")
MAX_MODEL_LEN = 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 8], help="T values (default 1 2 4 8)")
    p.add_argument("--kv-mib", type=int, default=256, help="KV budget in MiB (default 256)")
    p.add_argument("--requests", type=int, default=64, help="requests in the workload (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", help="write the records here")
    p.add_argument("--md", help="write the table here (Markdown)")
    return p.parse_args(argv)


def model_config(loops: int) -> LoopedLMConfig:
    return LoopedLMConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=64, rope_theta=10000.0,
                          max_position_embeddings=MAX_MODEL_LEN, total_ut_steps=loops)


def write_checkpoint(root: str, model: str, loops: int) -> tuple[str, dict]:
    """(folder, LLM keyword arguments) of a random checkpoint.  Ouro is saved by save_pretrained (model_type
    "melt" without a gate) and served as OuroForCausalLM through hf_overrides, as docs/serving.md#vllm says."""
    torch.manual_seed(0)
    looped = LoopedLM(model_config(loops))
    path = os.path.join(root, f"{model}-T{loops}")
    if model == "melt":
        to_melt(looped, "latent").save_pretrained(path)
        return path, {}
    looped.save_pretrained(path)
    return path, {"hf_overrides": {"architectures": ["OuroForCausalLM"]}}


def workload(requests: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1024) for _ in range(rng.randint(16, 256))] for _ in range(requests)]


def measure(path: str, extra: dict, args, prompts: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=True, seed=0,
              max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=args.kv_mib * 2**20, **extra)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        capacity = cache.num_gpu_blocks * cache.block_size
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0][:16]}], params, use_tqdm=False)  # first-step costs
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(p) for p in prompts)
    return dict(kv_capacity_tokens=capacity, max_concurrency=capacity / MAX_MODEL_LEN, seconds=seconds,
                output_tokens_per_s=generated / seconds, total_tokens_per_s=(generated + prompt_tokens) / seconds)


def table(records: list[dict]) -> str:
    lines = ["| model | T | KV bytes/token | KV capacity (tokens) | max concurrency | output tok/s | total tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['loops']} | {r['kv_bytes_per_token']:,} | {r['kv_capacity_tokens']:,} "
                     f"| {r['max_concurrency']:.1f}x | {r['output_tokens_per_s']:.0f} | "
                     f"{r['total_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    prompts = workload(args.requests)
    dtype = getattr(torch, args.dtype)
    records = []
    with tempfile.TemporaryDirectory() as root:
        for model in MODELS:
            for loops in args.loops:
                path, extra = write_checkpoint(root, model, loops)
                kind = "melt" if model == "melt" else "looplm"
                record = dict(model=model, loops=loops,
                              kv_bytes_per_token=kv_bytes_per_token(model_config(loops), kind, dtype),
                              **measure(path, extra, args, prompts))
                print(json.dumps(record), flush=True)
                records.append(record)
    import vllm

    meta = dict(kv_budget_bytes=args.kv_mib * 2**20, max_model_len=MAX_MODEL_LEN, requests=args.requests,
                prompt_lengths="uniform 16..256, seed 0", new_tokens=args.new_tokens, dtype=args.dtype,
                model=str(model_config(1)).replace("total_ut_steps=1", "total_ut_steps=T"),
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                vllm=vllm.__version__,
                torch=torch.__version__, eager=True)
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, records=records), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"vLLM serving, MELT (latent gate) against Ouro at one KV budget\n\n"
                    f"Command: `python benchmarks/vllm_serving.py`; {json.dumps(meta)}\n\n{table(records)}\n")
    return records


if __name__ == "__main__":
    main()
