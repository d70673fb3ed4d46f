"""Post-trains MELT from a LoopLM teacher checkpoint with the paper's recipe, in 1 or N processes.

    melt train --teacher Ouro-1.4B-Thinking --out runs/melt --gate latent --data tokens.npy
    torchrun --nproc-per-node 8 -m melt_kernels.train --teacher ... --out ...      # DDP: NCCL on GPUs, gloo on CPUs
    melt train ... --resume                                                       # from the newest checkpoint

(``melt train`` and ``python -m melt_kernels.train`` are the same command.)

The teacher (an Ouro checkpoint, or a LoopLM saved by this package) is loaded
frozen; the student is ``to_melt(teacher, gate)`` (or, with ``--resume``, the
newest checkpoint under ``--out``).  Defaults are the paper's recipe
(docs/training.md#the-recipe): 10,000-token sequences in chunks of 500, 32
sequences per step, 500 interpolated-transition steps then 300 of
attention-aligned distillation (beta 0.1), AdamW at 8e-6 (base) and 5e-4
(gates).  ``--batch`` is the global batch: each process trains on its
share.  Writes ``OUT/metrics.jsonl`` (one JSON record per step), checkpoints
under ``OUT/checkpoints`` and the final model in ``OUT/final``, with the
teacher's (or ``--tokenizer``'s) tokenizer files: it loads in transformers and
serves in vLLM as it is.

Data (``--data``): ``stdlib`` (Python's standard library source as bytes,
vocabulary 256; melt_kernels.train.data.stdlib_corpus), ``copy`` (the
synthetic copying task; sequences of 2 x --copy-length), or a file: ``.npy``
token ids; ``.txt`` text or ``.jsonl`` lines ({"text": ...}, or {"prompt":
..., "completion": ...}) tokenized by the tokenizer of ``--tokenizer``
(default: the teacher's folder; tokenizer.json through the tokenizers
package, else transformers' AutoTokenizer), documents joined by its
end-of-sequence token; any other file, or text without tokenizer files, its
bytes.  The last tenth of a file's tokens is held out.  Every run ends with
a held-out evaluation (``--eval-sequences``, not for ``copy`` when 0) of
teacher and student in chunks, token by token, and served (``--eval-prompt``
tokens prefilled in chunks, the rest decoded token by token).

Schedules: ``--chunk-cycle 1 2 4 8 16`` cycles the chunk size over the
steps; ``--decode-tokens N`` runs the last N tokens of every sequence one at
a time (what serving does after the prompt).  Pre-training: ``--gate none``
trains a copy of the LoopLM teacher itself (``--pretrain-steps``, with
``--pretrain-objective ouro`` Ouro's Stage I objective, exit gate included,
entropy weight ``--exit-beta``) instead of post-training MELT.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

from melt_kernels.checks import BACKENDS
from melt_kernels.cli import ArgumentProblem, reading, reporting
from melt_kernels.model import GATES
from melt_kernels.ouro import DTYPES, copy_tokenizer, load_ouro, to_melt
from melt_kernels.threads import cpu_threads
from melt_kernels.train import distributed
from melt_kernels.train.data import TEXT_SUFFIXES, CopyTask, Tokenizer, from_file, split_held_out, stdlib_corpus
from melt_kernels.train.evaluate import evaluate, gate_retention
from melt_kernels.train.recipe import MEMORY_MODES, PRETRAIN_OBJECTIVES, Recipe
from melt_kernels.train.trainer import Trainer


def parser(prog="python -m melt_kernels.train") -> argparse.ArgumentParser:
    d = Recipe()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--teacher", required=True, help="the LoopLM teacher's checkpoint folder (Ouro or this package's)")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, final/")
    p.add_argument("--gate", choices=GATES + ("none",), default="latent",
                   help="the student's gate: latent (the MELT paper's, default), kv-head or kv-element (this "
                        "package's); none: pre-train a copy of the LoopLM itself (--pretrain-steps)")
    p.add_argument("--data", default="stdlib", help="stdlib, copy, or a file: .npy token ids, .txt / .jsonl text "
                                                    "(tokenized), any other file's bytes")
    p.add_argument("--tokenizer", help="folder of the tokenizer files for .txt / .jsonl data (default: --teacher's "
                                       "when it has them, else the text's bytes)")
    p.add_argument("--copy-symbols", type=int, default=16)
    p.add_argument("--copy-length", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--chunk", type=int, default=d.chunk_size, help=f"chunk size (default {d.chunk_size})")
    p.add_argument("--chunk-cycle", type=int, nargs="+", default=list(d.chunk_cycle),
                   help="chunk sizes cycled over the steps (instead of --chunk)")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens,
                   help="the last N tokens of every sequence run one at a time, as serving decodes")
    p.add_argument("--batch", type=int, default=d.batch_size, help=f"global sequences per step (default "
                                                                   f"{d.batch_size})")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="LoopLM pre-training steps "
                                                                               "(with --gate none)")
    p.add_argument("--pretrain-objective", choices=PRETRAIN_OBJECTIVES, default=d.pretrain_objective,
                   help="last-loop: the last loop's cross-entropy; ouro: Ouro's Stage I (expected cross-entropy "
                        "over the exit distribution - exit-beta x its entropy; trains the exit gate)")
    p.add_argument("--exit-beta", type=float, default=d.exit_beta, help=f"entropy weight of Ouro's objective "
                                                                       f"(default {d.exit_beta:g})")
    p.add_argument("--transition-steps", type=int, default=d.transition_steps)
    p.add_argument("--distill-steps", type=int, default=d.distill_steps)
    p.add_argument("--beta", type=float, default=d.beta, help="attention-alignment weight of phase 2")
    p.add_argument("--lr", type=float, default=d.lr, help=f"base weights' AdamW rate (default {d.lr:g})")
    p.add_argument("--gate-lr", type=float, default=d.gate_lr, help=f"gates' AdamW rate (default {d.gate_lr:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient norm clip (0: none)")
    p.add_argument("--memory", choices=MEMORY_MODES, default=d.memory,
                   help="exact: one backward through every chunk; detach: truncated backpropagation, one chunk's "
                        "graph at a time")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under --out")
    p.add_argument("--eval-sequences", type=int, default=16,
                   help="held-out sequences to evaluate teacher and student on at the end (0: none; fewer when "
                        "the held-out tokens hold fewer)")
    p.add_argument("--eval-prompt", type=int, help="tokens prefilled in chunks before decoding in the served "
                                                   "evaluation (default: half a sequence)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads per process (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    return p


def make_tokenizer(args):
    """The tokenizer for text data: --tokenizer's, else the teacher's when its folder has tokenizer files, else
    None (the text's bytes)."""
    if not args.data.endswith(TEXT_SUFFIXES):
        return None
    folder = args.tokenizer or args.teacher
    if not os.path.isdir(folder):  # else transformers would look for a Hub repository of that name
        raise FileNotFoundError(f"{folder} is not a folder")
    if args.tokenizer is None and not any(os.path.exists(os.path.join(folder, name))
                                          for name in ("tokenizer.json", "tokenizer_config.json")):
        print(f"# {folder} has no tokenizer files: {args.data} is read as bytes", file=sys.stderr)
        return None
    return Tokenizer(folder)


def make_source(args, tokenizer):
    """(training source, held-out source, seq_len); a text file is encoded by ``tokenizer`` (:func:`make_tokenizer`)."""
    if args.data == "copy":
        task = CopyTask(args.copy_symbols, args.copy_length)
        return task, task, task.seq_len
    if args.data == "stdlib":
        train, held = stdlib_corpus().streams(args.seq_len)
        return train, held, args.seq_len
    train, held = split_held_out(from_file(args.data, None, args.seq_len, tokenizer))
    return train, held, args.seq_len


def held_out_batch(held, args, context):
    """Up to --eval-sequences held-out sequences, a multiple of the number of processes (None when none fit)."""
    if isinstance(held, CopyTask):
        count = args.eval_sequences
    else:
        count = min(args.eval_sequences, held.tokens.numel() // (held.seq_len + 1))
    count -= count % context.world
    if count < 1:
        return None
    if isinstance(held, CopyTask):
        return held.sample(count, torch.Generator().manual_seed(args.seed + 1))
    return held.windows(count)


def final_evaluation(teacher, student, student_kind, batch, recipe, prompt, context) -> dict:
    """Teacher against student on ``batch``: in the recipe's chunks, token by token, and served (``prompt``
    tokens prefilled in chunks, the rest decoded).  The teacher's token-by-token loss is not run: a LoopLM cache
    gives the same logits however the sequence is chunked."""
    result = {}
    for name, model, kind in (("teacher", teacher, "looplm"), ("student", student, student_kind)):
        result[name] = evaluate(model, kind, batch, recipe.chunk_size, context=context)
        result[name + "_served"] = evaluate(model, kind, batch, recipe.chunk_size, prompt=prompt, context=context)
    result["student_decode"] = evaluate(student, student_kind, batch, 1, context=context)
    result["gate_retention"] = gate_retention(student, batch, recipe.chunk_size, context=context)
    return result


def main(argv=None, prog="python -m melt_kernels.train") -> dict:
    """The command line; returns the final summary it printed (the ``melt`` script drops it)."""
    p = parser(prog)
    args = p.parse_args(argv)
    with reporting(p.prog), cpu_threads(args.threads):
        with distributed.session(args.device) as context:
            return run(args, context)


def run(args, context) -> dict:
    """Trains and evaluates; a problem with an argument's file or folder is an
    :class:`~melt_kernels.cli.ArgumentProblem` naming the argument, raised before training starts."""
    if args.pretrain_steps and args.gate != "none":
        raise ArgumentProblem("argument --pretrain-steps: it trains the LoopLM itself: pass --gate none (then "
                              "post-train the result with a gate)")
    with reading("--teacher"):
        teacher = load_ouro(args.teacher, dtype=args.dtype, device=context.device, backend=args.backend)
    if teacher.config.gate is not None:
        raise ArgumentProblem(f"argument --teacher: {args.teacher} holds a MELT model (gate "
                              f"{teacher.config.gate!r}); the teacher is a LoopLM")
    with reading("--tokenizer" if args.tokenizer else "--teacher"):
        tokenizer = make_tokenizer(args)
    with reading("--data"):
        source, held_out, seq_len = make_source(args, tokenizer)
    recipe = Recipe(seq_len=seq_len, chunk_size=args.chunk, batch_size=args.batch, pretrain_steps=args.pretrain_steps,
                    transition_steps=args.transition_steps, distill_steps=args.distill_steps, beta=args.beta,
                    lr=args.lr, gate_lr=args.gate_lr, weight_decay=args.weight_decay,
                    warmup_steps=args.warmup_steps, clip=args.clip or None, memory=args.memory,
                    pretrain_objective=args.pretrain_objective, exit_beta=args.exit_beta,
                    chunk_cycle=tuple(args.chunk_cycle), decode_tokens=args.decode_tokens)
    student = copy.deepcopy(teacher) if args.gate == "none" else to_melt(teacher, args.gate)
    student_kind = "looplm" if args.gate == "none" else "melt"
    trainer = Trainer(student, recipe, source, teacher=teacher, context=context, seed=args.seed, out_dir=args.out,
                      save_every=args.save_every, keep=args.keep, progress=not args.no_progress)
    resumed = trainer.resume() if args.resume else None
    say = print if context.main else (lambda *a, **k: None)
    say(f"# {context.world} process(es) on {context.device}; teacher {args.teacher} "
        f"({sum(p.numel() for p in teacher.parameters()):,} parameters, T={teacher.num_loops}), gate {args.gate!r}; "
        f"{recipe.total_steps} steps of {recipe.batch_size} x {recipe.seq_len} tokens in chunks of "
        f"{'/'.join(map(str, recipe.chunk_cycle)) or recipe.chunk_size}, the last {recipe.decode_tokens} one at a time"
        + (f"; resumed from {resumed}" if resumed else ""), file=sys.stderr)
    trainer.run()
    final = os.path.join(args.out, "final")
    if context.main:  # the model as it is served: weights, config and the teacher's tokenizer
        student.save_pretrained(final)
        copy_tokenizer(args.tokenizer or args.teacher, final)
    context.barrier()
    result = {"final": final, "steps": trainer.step, "last": trainer.history[-1] if trainer.history else None}
    batch = held_out_batch(held_out, args, context) if args.eval_sequences else None
    if batch is not None:
        prompt = args.eval_prompt or seq_len // 2
        result["eval"] = final_evaluation(teacher, student, student_kind, batch, recipe, prompt, context)
    say(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
