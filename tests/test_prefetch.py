"""prefetch: items in order from a background thread, errors passed on, early exit
stops the thread, and loading really overlaps with the consumer's work."""

import itertools
import threading
import time

import pytest

from semclust.runtime.prefetch import prefetch

NAME = "semclust-prefetch"


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == NAME]


@pytest.fixture(autouse=True)
def _no_stray_threads():
    assert _prefetch_threads() == []
    yield
    deadline = time.monotonic() + 2.0
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _prefetch_threads() == [], "a prefetch thread outlived its test"


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 17])
def test_order_preserved(depth, n):
    items = [(i, f"item-{i}") for i in range(n)]
    assert list(prefetch(iter(items), depth=depth)) == items
    # any iterable, consumed once: a generator yields each item once, in order
    assert list(prefetch((i * i for i in range(n)), depth=depth)) == [i * i for i in range(n)]


def test_items_are_produced_on_another_thread():
    producers = []

    def gen():
        for i in range(5):
            producers.append(threading.current_thread().name)
            yield i

    assert list(prefetch(gen(), depth=2)) == list(range(5))
    assert producers == [NAME] * 5


def test_producer_runs_at_most_depth_ahead():
    produced = []

    def gen():
        for i in itertools.count():
            produced.append(i)
            yield i

    depth = 3
    it = prefetch(gen(), depth=depth)
    assert next(it) == 0
    time.sleep(0.2)  # ample time for the producer to fill the queue
    # consumed 1, queue holds `depth`, and the producer may hold one more it cannot put
    assert depth + 1 <= len(produced) <= depth + 2
    it.close()


@pytest.mark.parametrize("depth", [1, 3])
def test_error_reaches_consumer_after_earlier_items(depth):
    def gen():
        yield from range(4)
        raise KeyError("bad row 4")

    got = []
    with pytest.raises(KeyError, match="bad row 4"):
        for x in prefetch(gen(), depth=depth):
            got.append(x)
    assert got == [0, 1, 2, 3]


def test_error_at_first_item():
    def gen():
        raise OSError("cannot open")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="cannot open"):
        next(prefetch(gen()))


def test_breaking_early_stops_the_producer():
    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    got = []
    for x in prefetch(endless(), depth=2):
        got.append(x)
        if len(got) == 3:
            break
    assert got == [0, 1, 2]
    # the generator was closed on leaving the loop, which joined the thread
    assert _prefetch_threads() == []
    n = len(produced)
    time.sleep(0.05)
    assert len(produced) == n, "the producer kept going after the consumer left"


def test_consumer_error_stops_the_producer():
    def endless():
        yield from itertools.count()

    with pytest.raises(ZeroDivisionError):
        for x in prefetch(endless(), depth=1):
            if x == 2:
                1 / 0
    assert _prefetch_threads() == []


@pytest.mark.parametrize("depth", [0, -1])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        list(prefetch(range(3), depth=depth))


def test_loading_overlaps_with_work():
    """10 items, 0.05 s to produce and 0.05 s to consume each: 1.0 s one after the other,
    about 0.55 s when the two overlap."""

    def slow():
        for i in range(10):
            time.sleep(0.05)
            yield i

    start = time.perf_counter()
    got = []
    for x in prefetch(slow(), depth=2):
        time.sleep(0.05)
        got.append(x)
    elapsed = time.perf_counter() - start
    assert got == list(range(10))
    assert elapsed < 0.85, f"took {elapsed:.2f} s: producing and consuming did not overlap"
