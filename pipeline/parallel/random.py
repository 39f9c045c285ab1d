"""The RNG rule of tensor parallelism: the same random numbers where TP ranks hold the same tensor, different
ones where they hold different slices.

The default generator is seeded alike on every TP rank, so dropout on replicated activations (residual stream,
embeddings) is identical across the group, as it must be. Attention dropout acts on each rank's own heads, so
it runs inside `tp_rng(tp_rank)`: a generator seeded from one draw of the default generator and the TP rank.
Because that seed is drawn from the default generator, activation-checkpoint recomputation (which restores the
default generator's state) replays exactly the same masks; and the default stream advances alike on every rank.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_SEED_SPACE = 2**62


@contextlib.contextmanager
def tp_rng(tp_rank: int):
    """Run the body with a generator state particular to this TP rank; restore the shared stream after."""
    seed = int(torch.randint(0, _SEED_SPACE, (1,)).item())  # advances the shared stream alike on every rank
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        mixed = (seed + 1_000_003 * (tp_rank + 1)) % _SEED_SPACE
        torch.manual_seed(mixed)
        yield


def tp_rng_context(tp_rank: int):
    """A zero-argument context factory for `Attention.dropout_rng`."""
    return functools.partial(tp_rng, tp_rank)
