"""Chunk-wise MELT post-training from a LoopLM teacher (arXiv 2605.07721; docs/training.md#the-recipe), in 1 or N
processes.

* :mod:`~melt_kernels.train.recipe`: the paper's recipe (its settings, the
  losses, one chunk-wise step, the bounded-memory mode);
* :mod:`~melt_kernels.train.trainer`: the loop (AdamW with base and gate
  learning rates, DDP, checkpoints, metrics, progress);
* :mod:`~melt_kernels.train.data`: the sources (a copying task, token
  streams, Python's standard library as a byte corpus);
* :mod:`~melt_kernels.train.walks`, :mod:`~melt_kernels.train.chains`: tasks
  that need depth (permutation walks; chains of variable assignments), for
  ``examples/depth_claim.py``;
* :mod:`~melt_kernels.train.evaluate`: held-out loss, chunk-wise, token by
  token or served (a prompt prefilled in chunks, the rest decoded), accuracy
  per difficulty, and the gates' retention per loop;
* :mod:`~melt_kernels.train.comparison`: the models of a comparison trained
  alike (standard, LoopLM, MELT post-trained), resumable from a work dir;
* :mod:`~melt_kernels.train.distributed`, :mod:`~melt_kernels.train.checkpoint`.

``melt train --teacher OURO_DIR --out RUN_DIR ...`` (or ``python -m melt_kernels.train``) runs it
(under ``torchrun --nproc-per-node N`` for N processes).
"""
from melt_kernels.train.chains import VariableChains
from melt_kernels.train.data import IGNORE, CopyTask, TokenStream, stdlib_corpus
from melt_kernels.train.evaluate import evaluate, gate_retention
from melt_kernels.train.recipe import (LossWeights, Phase, Recipe, chunkwise_step, logit_kl, recorded_attention,
                                       stack_attention, task_metrics)
from melt_kernels.train.trainer import Trainer
from melt_kernels.train.walks import PermutationWalks

__all__ = ["IGNORE", "CopyTask", "TokenStream", "stdlib_corpus", "evaluate", "gate_retention", "LossWeights",
           "Phase", "Recipe", "chunkwise_step", "logit_kl", "recorded_attention", "stack_attention", "task_metrics",
           "Trainer", "PermutationWalks", "VariableChains"]
