"""The :class:`Runner` protocol every inference back end implements, and the one batching helper.

A runner wraps one loaded model (cf. Polygraphy's ``BaseRunner``). :class:`cmdeploy.Segmenter`
talks to runners only through this protocol, so a new back end (a Triton client, a server's shared
session) plugs in by implementing it. Faults map to the same error class in every back end: a
missing or unreadable model path is :class:`~cmdeploy.errors.InputError` (the user's input); a model
that cannot be loaded or run is :class:`~cmdeploy.errors.ModelError`.

Batching lives here and nowhere else: :func:`batch_chunks` cuts N items into calls, and
:func:`run_batched` runs any N through a runner within its :attr:`Runner.batch_range`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

Feeds = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


@runtime_checkable
class Runner(Protocol):
    """One loaded model.

    Attributes:
        input_names, output_names: the model's tensor names, in model order.
        input_shapes: per input, its dimensions with the batch axis first; ``None`` marks a
            dimension that is not fixed (a dynamic axis, or one a TensorRT profile lets vary).
        batch_range: ``(min, max)`` items one :meth:`run` call accepts; ``max`` None = unlimited.
    """

    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, tuple[int | None, ...]]
    batch_range: tuple[int, int | None]

    def run(self, feeds: Feeds) -> Outputs:
        """``{input name: (N, ...) array}`` -> ``{output name: (N, ...) array}``."""
        ...

    def close(self) -> None:
        """Release the model (sessions, device memory); the runner is unusable afterwards."""
        ...


def batch_chunks(n: int, max_batch: int) -> list[tuple[int, int]]:
    """Split ``n`` items into contiguous ``(start, stop)`` chunks of at most ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [(s, min(s + max_batch, n)) for s in range(0, n, max_batch)]


def _pad(arr: np.ndarray, min_batch: int) -> np.ndarray:
    """Repeat the first item up to ``min_batch`` items (static or profile-bounded batch axes)."""
    short = min_batch - len(arr)
    if short <= 0:
        return arr
    return np.concatenate([arr, np.repeat(arr[:1], short, axis=0)])


def run_chunked(
    run: Callable[[Feeds], Outputs], feeds: Feeds, step: int, *, min_batch: int = 1
) -> Outputs:
    """Call ``run`` on chunks of at most ``step`` items of ``feeds`` (all share axis 0's length);
    chunks shorter than ``min_batch`` are padded by repeating their first item. Outputs are cut
    back to each chunk's real items and concatenated along axis 0."""
    n = len(next(iter(feeds.values())))
    outs: list[Outputs] = []
    for a, b in batch_chunks(n, step):
        got = run({k: _pad(v[a:b], min_batch) for k, v in feeds.items()})
        outs.append({k: np.asarray(v)[: b - a] if b - a < min_batch else v for k, v in got.items()})
    if len(outs) == 1:
        return outs[0]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def run_batched(runner: Runner, feeds: Feeds, *, batch_size: int | None = None) -> Outputs:
    """Run any number of items through ``runner``: calls of at most ``batch_size`` items (capped by
    the runner's maximum, raised to its minimum), the last one padded to the minimum."""
    lo, hi = runner.batch_range
    step = batch_size or hi or len(next(iter(feeds.values())))
    step = max(min(step, hi or step), lo, 1)
    return run_chunked(runner.run, feeds, step, min_batch=lo)
