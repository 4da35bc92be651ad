"""What a served version learns about time: one running average, and the model's costs built on it.

`ModelCosts` is the one learner of what a version's work takes: compute seconds per padded batch
size (timed by the batcher) and decode seconds per image (timed on the preprocessing pool), both as
`Ewma`s of the same weight.

Every batching and admission rule is written in these learned seconds, never in constants, so the
same rules hold on a 2-core CPU (a ResNet50 batch in 0.2 s) and on a GPU a hundred times faster.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

# Weight of the newest sample in every learned average: recent enough to follow a host that changes
# speed within minutes, smooth enough that one slow batch (a GC pause, a noisy neighbour) is a third.
EWMA_WEIGHT = 0.3


class Ewma:
    """An exponentially weighted moving average; `value` is None until the first sample."""

    __slots__ = ("value", "weight")

    def __init__(self, weight: float = EWMA_WEIGHT, value: float | None = None) -> None:
        self.weight = weight
        self.value = value

    def add(self, sample: float) -> float:
        old = self.value
        self.value = sample if old is None else old + self.weight * (sample - old)
        return self.value


class ModelCosts:
    """Learned seconds per padded batch size (an EWMA per size of the batcher's own timings), and
    per image decoded (an EWMA of the pool's time per image, for the expected decode wait)."""

    def __init__(self, max_batch_size: int, pad: Callable[[int], int]) -> None:
        self.max_batch_size = max_batch_size
        self._pad = pad
        self._seconds: dict[int, Ewma] = {}
        self._sizes: list[int] = []  # the learned sizes, sorted: read on every admission
        self._decode = Ewma()

    @property
    def decode_s_per_image(self) -> float | None:
        """Learned pool seconds per image to decode/resize, None until an image was prepared."""
        return self._decode.value

    def learn_decode(self, images: int, busy_s: float) -> None:
        """A pool call prepared `images` images in `busy_s` seconds of pool time (not the wait for a
        thread): what an expected decode wait is built on."""
        self._decode.add(busy_s / max(images, 1))

    def __bool__(self) -> bool:
        """Whether any batch size's compute time was learned (decode times do not count)."""
        return bool(self._sizes)

    def learn(self, size: int, seconds: float) -> None:
        if size not in self._seconds:
            bisect.insort(self._sizes, size)
            self._seconds[size] = Ewma()
        self._seconds[size].add(seconds)

    def known(self, size: int) -> float | None:
        """The learned time of exactly this padded size, or None."""
        entry = self._seconds.get(size)
        return None if entry is None else entry.value

    def __call__(self, size: int) -> float:
        """Seconds the model takes for `size` rows (after padding); 0.0 until a batch has run.

        Sizes not yet seen are interpolated between the nearest seen sizes, extended along the slope
        of the two largest above them, and scaled by rows below the smallest."""
        if not self._sizes or size < 1:
            return 0.0
        size = self._pad(min(size, self.max_batch_size))
        exact = self.known(size)
        if exact is not None:
            return exact
        sizes, t = self._sizes, self.known
        if size < sizes[0]:
            return t(sizes[0]) * size / sizes[0]  # a lower bound, as if no fixed cost
        if size > sizes[-1]:
            # The slope of the two largest sizes seen; with one size only, time per row (an upper
            # bound: a batch also has a fixed cost that does not grow with it).
            top = t(sizes[-1])
            if len(sizes) == 1:
                return top * size / sizes[-1]
            slope = max(0.0, (top - t(sizes[-2])) / (sizes[-1] - sizes[-2]))
            return top + slope * (size - sizes[-1])
        hi = bisect.bisect_left(sizes, size)
        a, b = sizes[hi - 1], sizes[hi]
        ta, tb = t(a), t(b)
        return ta + (tb - ta) * (size - a) / (b - a)

    def rows_seconds(self, rows: int) -> float:
        """Seconds to compute `rows` rows in full batches and then the rest, on one slot."""
        full, rest = divmod(rows, self.max_batch_size)
        return full * self(self.max_batch_size) + self(rest)

    def worth_waiting(self, queued: int, target: int) -> float:
        """The longest idle wait for `target` rows (instead of running `queued` now) that still pays.

        Running `queued` rows now yields queued / cost(queued) rows a second; waiting w for `target`
        yields target / (w + cost(target)). The wait pays while the second is larger, that is while
        w < target * cost(queued) / queued - cost(target): break-even, in the model's own seconds.
        """
        queued = max(queued, 1)
        if target <= queued:
            return 0.0
        now_s = self(queued)
        if now_s <= 0:
            return 0.0
        return max(0.0, target * now_s / queued - self(target))


# One served call in this many runs the way not currently preferred, so both ways stay timed under
# the load they serve: a choice made once, on a quiet machine, can be wrong under load (XLA chosen by
# one quiet call per size lost to the plain signature at 16 and 64 callers). Costs at most 1/16 of
# the difference between the two.
EXPLORE_EVERY = 16


class FasterOf:
    """Which of two ways to compute one batch size is faster, learned from the calls that serve
    traffic (with the server's own threads, decoding and contention), started from a quiet timing."""

    def __init__(self, first_s: float, second_s: float) -> None:
        self._times = (Ewma(value=first_s), Ewma(value=second_s))
        self._calls = 0

    @property
    def preferred(self) -> int:
        """0 or 1: the way with the lower learned time."""
        first, second = (t.value or 0.0 for t in self._times)
        return 0 if first <= second else 1

    @property
    def seconds(self) -> tuple[float, float]:
        return (self._times[0].value or 0.0, self._times[1].value or 0.0)

    def pick(self) -> int:
        self._calls += 1
        best = self.preferred
        return 1 - best if self._calls % EXPLORE_EVERY == 0 else best

    def record(self, way: int, seconds: float) -> None:
        self._times[way].add(seconds)
