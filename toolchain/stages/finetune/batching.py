"""What one optimizer step trains on: the seeded example order, each rank's micro-batches, the learning rate, and
the loss on the trained tokens. Pure functions of the step, so a resumed run and every DeepSpeed rank see exactly
what an uninterrupted single-process run sees."""
from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch

from toolchain.hf.data import IGNORE
from toolchain.runtime.errors import ToolchainError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, spec) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(1, spec.max_steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def step_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of optimizer step `step`: a fresh seeded permutation each epoch, read in order. A pure
    function of the step, so a resumed run and each DeepSpeed rank see exactly what an uninterrupted run sees."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range(step * batch_size, (step + 1) * batch_size)]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    perm = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(perm)
    return tuple(perm)


def micro_batches(indices: list[int], rank: int, world: int, accum: int, length=None) -> list[list[int]]:
    """This rank's share of a step, cut into `accum` micro-batches; with `length` (example index -> tokens) sorted
    by it first, so each micro-batch pads to a like length (train.sort_micro_batches: the same summed gradient)."""
    if len(indices) % (world * accum):
        raise ToolchainError(f"recipe key 'train.batch_size': {len(indices)} examples per step do not split into "
                             f"{world} rank(s) x {accum} micro-batch(es); make batch_size a multiple of {world * accum}")
    mine = indices[rank::world]
    if length is not None:
        mine = sorted(mine, key=length)
    k = len(mine) // accum
    return [mine[i * k:(i + 1) * k] for i in range(accum)]


def causal_lm_loss(net, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy computed only where labels carry loss.

    Equal to the model's own loss, but the output projection runs on the few trained positions instead of every
    position: with a 49k vocabulary and chat data where most tokens are prompt, that is most of the lm_head work.
    """
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep], reduction=reduction)


def trained_tokens(examples: list[dict]) -> int:
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in examples)
