"""Which post-training chunk schedule makes MELT good both at chunked prefill and at token-by-token decoding?

One small setting (stdlib bytes, hidden 96, 2 layers, T = 4, sequences of 96, batch 16, 1 thread): a LoopLM
teacher pre-trained with Ouro's objective (saved under --teacher-dir and reused by later runs), then MELT
(latent gate) post-trained with the recipe's two phases under one schedule, evaluated on held-out windows in
chunks of 16, token by token, and served (48 bytes prefilled in chunks of 16, 48 decoded token by token).
One schedule per run, one JSON line appended to --out:

    python examples/serve_schedule.py --schedule fixed-16 --out schedules.jsonl
    python examples/serve_schedule.py --schedule fixed-1 --out schedules.jsonl
    python examples/serve_schedule.py --schedule cycle --out schedules.jsonl     # chunk sizes 1, 2, 4, 8, 16 by step
    python examples/serve_schedule.py --schedule decode-48 --out schedules.jsonl # 48 in chunks of 16, then 48 x 1
    python examples/serve_schedule.py --schedule decode-16 --out schedules.jsonl # 80 in chunks of 16, then 16 x 1
    python examples/serve_schedule.py --schedule decode-8 --out schedules.jsonl  # 88 in chunks of 16, then 8 x 1
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from melt_kernels.model import LoopedLM, LoopedLMConfig
from melt_kernels.ouro import load_ouro, to_melt
from melt_kernels.threads import cpu_threads
from melt_kernels.train import Recipe, Trainer, evaluate, gate_retention, stdlib_corpus

SEQ, CHUNK, PROMPT = 96, 16, 48
SCHEDULES = {"fixed-16": dict(chunk_size=16), "fixed-1": dict(chunk_size=1),
             "cycle": dict(chunk_cycle=(1, 2, 4, 8, 16)),
             "decode-48": dict(chunk_size=16, decode_tokens=48), "decode-16": dict(chunk_size=16, decode_tokens=16),
             "decode-8": dict(chunk_size=16, decode_tokens=8)}


def config() -> LoopedLMConfig:
    return LoopedLMConfig(vocab_size=256, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=24, intermediate_size=288, total_ut_steps=4,
                          rope_theta=1e4, max_position_embeddings=128)


def teacher(args, train) -> LoopedLM:
    """The Ouro-objective LoopLM, trained once and saved under --teacher-dir."""
    if os.path.exists(os.path.join(args.teacher_dir, "config.json")):
        return load_ouro(args.teacher_dir, dtype="float32", device="cpu")
    torch.manual_seed(args.seed)
    model = LoopedLM(config())
    recipe = Recipe(seq_len=SEQ, chunk_size=SEQ, batch_size=16, pretrain_steps=args.pretrain_steps,
                    transition_steps=0, distill_steps=0, lr=3e-3, warmup_steps=args.pretrain_steps // 10,
                    schedule="cosine", pretrain_objective="ouro", exit_beta=args.exit_beta)
    start = time.perf_counter()
    Trainer(model, recipe, train, seed=args.seed, progress=False).run()
    print(f"# teacher: {args.pretrain_steps} Ouro-objective steps in {time.perf_counter() - start:.0f} s", flush=True)
    model.save_pretrained(args.teacher_dir)
    return model


def scores(model: LoopedLM, kind: str, held) -> dict:
    return {"chunks": evaluate(model, kind, held, CHUNK)["bits_per_token"],
            "token_by_token": evaluate(model, kind, held, 1)["bits_per_token"],
            "served": evaluate(model, kind, held, CHUNK, prompt=PROMPT)["bits_per_token"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", choices=sorted(SCHEDULES), required=True)
    p.add_argument("--out", required=True, help="JSON lines file the run's record is appended to")
    p.add_argument("--teacher-dir", default="runs/serve-schedule-teacher")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--exit-beta", type=float, default=0.05)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with cpu_threads(1):
        train, held_stream = stdlib_corpus().streams(SEQ)
        held = held_stream.windows(args.eval_sequences)
        looplm = teacher(args, train)
        recipe = Recipe(seq_len=SEQ, batch_size=16, transition_steps=100, distill_steps=60, lr=3e-4, gate_lr=1e-2,
                        **SCHEDULES[args.schedule])
        student = to_melt(looplm, "latent")
        start = time.perf_counter()
        Trainer(student, recipe, train, teacher=looplm, seed=args.seed, progress=False).run()
        seconds = time.perf_counter() - start
        record = {"schedule": args.schedule, "recipe": SCHEDULES[args.schedule], "train_seconds": seconds,
                  "teacher": scores(looplm, "looplm", held),
                  "teacher_per_loop": evaluate(looplm, "looplm", held, per_loop=True)["bits_per_token_per_loop"],
                  "last_step": scores(to_melt(looplm, "latent"), "melt", held),
                  "melt": scores(student, "melt", held), "gate_retention": gate_retention(student, held, CHUNK)}
    print(json.dumps(record), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
