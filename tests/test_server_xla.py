"""XLA-compiled serving (loader.py): compiled sizes agree with the exported signature within 1e-4,
each is served by whichever function is faster in the serving calls, sizes in between run plain or
padded to the next compiled size, and --no-xla turns it all off."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the XLA tests need the server extra")

from _models import LABELS, export_tiny  # noqa: E402
from _serving import client, start_server, stop_server, wait_serving  # noqa: E402
from fovea.server import loader  # noqa: E402

SIZE = 24


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("models"), "tiny", SIZE, seed=3)


def test_compiled_sizes_agree_with_the_signature(published: Path) -> None:
    model = loader.load(str(published), "tiny", 1, xla_sizes=(1, 4))
    model.warm_up([1, 8])
    assert model.wait_compiled(120)
    assert sorted(model.xla_timings) == [1, 4]  # both compiled, checked and timed
    assert set(model.compiled_sizes) <= {1, 4}
    rng = np.random.default_rng(7)
    for size in (1, 4):
        images = rng.integers(0, 256, size=(size, SIZE, SIZE, 3), dtype=np.uint8)
        plain = model.predict_plain(images)
        compiled = model.predict_compiled(images)
        assert compiled.shape == plain.shape == (size, len(LABELS))
        np.testing.assert_allclose(compiled, plain, rtol=0, atol=loader.XLA_TOLERANCE)
        # Which of the two serves a call is learned from the serving calls' times (FasterOf, tested
        # in test_server_batcher), so the answer is exactly one of the two ways, bit for bit.
        served = model.predict(images)
        assert np.array_equal(served, compiled) or np.array_equal(served, plain)
    # A size in between (3) runs plain, or compiled at 4 with a zero row, whichever serves faster.
    assert set(model.padded_sizes.items()) <= {(2, 4), (3, 4)}
    images = rng.integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    padded = np.concatenate([images, np.zeros((1, SIZE, SIZE, 3), np.uint8)])
    plain, compiled = model.predict_plain(images), model.predict_compiled(padded)[:3]
    ways = set()
    for _ in range(40):  # one call in 16 tries the way not preferred: both ways serve
        served = model.predict(images)
        assert served.shape == (3, len(LABELS))
        ways |= {way for way, want in ((0, plain), (1, compiled)) if np.array_equal(served, want)}
    assert ways == {0, 1} or np.array_equal(plain, compiled)
    with pytest.raises(KeyError):
        model.predict_compiled(np.zeros((3, SIZE, SIZE, 3), np.uint8))  # never compiled: no such size
    model.release()


def test_calls_skip_tensorflows_argument_binding_and_answer_alike(published: Path) -> None:
    # The served calls go through the functions' flat call (no per-call binding of structured
    # arguments), checked at load against TensorFlow's public call; without one, the public call.
    model = loader.load(str(published), "tiny", 1, xla_sizes=(2,))
    model.warm_up([1, 2])
    assert model.wait_compiled(120)
    images = np.random.default_rng(5).integers(0, 256, size=(2, SIZE, SIZE, 3), dtype=np.uint8)
    tensor = tf.constant(images)
    public_plain = model._signature(**{loader.INPUT_IMAGES: tensor})[loader.OUTPUT].numpy()
    assert model._plain is not None and model._plain.__name__ == "call"  # the flat call was kept
    np.testing.assert_array_equal(model.predict_plain(images), public_plain)
    if 2 in model._built:  # compiled (and agreeing with the signature)
        np.testing.assert_allclose(model.predict_compiled(images), public_plain, atol=loader.XLA_TOLERANCE)

    def public(t: tf.Tensor) -> tf.Tensor:
        return model._signature(**{loader.INPUT_IMAGES: t})[loader.OUTPUT]

    class NoFlatCall:  # a TensorFlow whose functions lack the private flat call
        pass

    assert loader._unbound(NoFlatCall(), public, tensor) is public

    class WrongFlatCall:  # or whose flat call answers something else: the public call stays
        captured_inputs = ()

        def _call_flat(self, args, captured):
            return tf.zeros([2, len(LABELS)])

    assert loader._unbound(WrongFlatCall(), public, tensor) is public
    model.release()


def test_without_xla_nothing_is_compiled(published: Path) -> None:
    model = loader.load(str(published), "tiny", 1)
    model.warm_up([1, 2])
    assert model.wait_compiled(0)  # nothing to compile: done at once
    assert model.compiled_sizes == [] and model.xla_timings == {}
    model.release()


def test_server_with_xla_compiles_powers_of_two_and_answers_like_without(published: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    answers = []
    for xla in (True, False):
        srv = start_server(published.parents[1], max_batch_size=4, xla=xla)
        try:
            assert srv.settings.allowed_batch_sizes == ()  # compiled sizes are not padded to
            with client(srv.port) as c:
                wait_serving(c)
                (served,) = srv.manager.loaded()
                assert served.model.wait_compiled(120)
                assert sorted(served.model.xla_timings) == ([1, 2, 4] if xla else [])
                result = c.predict(list(images), return_probabilities=True)
            answers.append(np.array([p.probabilities for p in result]))
        finally:
            stop_server(srv)
    np.testing.assert_allclose(answers[0], answers[1], rtol=0, atol=loader.XLA_TOLERANCE)


def test_a_retrained_version_runs_the_program_its_predecessor_compiled(tmp_path: Path) -> None:
    # Same architecture, other weights (a retrain): one graph, so one XLA program, called with each
    # version's own variables. Other labels make another graph.
    old_path = export_tiny(tmp_path / "a", "tiny", SIZE, seed=11)
    new_path = export_tiny(tmp_path / "b", "tiny", SIZE, seed=12)
    other_path = export_tiny(tmp_path / "c", "tiny", SIZE, labels=("a", "b", "c", "d"), seed=11)
    old = loader.load(str(old_path), "tiny", 1, xla_sizes=(1, 4))
    old.warm_up([1, 4])
    assert old.wait_compiled(120) and sorted(old.xla_timings) == [1, 4]
    program = old._program
    traced = dict(program._sizes)
    # What the old version learns while serving is where the next one starts.
    old._choices[4].record(1, 0.5)
    learned = old._choices[4].seconds
    signature = weakref.ref(old._signature)
    old.release()
    del old
    gc.collect()
    assert signature() is None  # the shared program keeps no version (nor its weights) alive
    assert program.timings[4] == learned

    new = loader.load(str(new_path), "tiny", 2, xla_sizes=(1, 4))
    new.warm_up([1, 4])
    # Only runs were left, made in the warm-up: the version serves compiled from its first request.
    assert new.wait_compiled(0) and sorted(new.xla_timings) == [1, 4]
    assert new._program is program and program._sizes == traced  # nothing traced or compiled again
    assert new.xla_timings[4] == learned
    images = np.random.default_rng(2).integers(0, 256, size=(4, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        new.predict_compiled(images), new.predict_plain(images), atol=loader.XLA_TOLERANCE
    )
    # The weights are the new version's own: the old version's answers differ.
    old_again = loader.load(str(old_path), "tiny", 1)
    assert (
        np.max(np.abs(old_again.predict_plain(images) - new.predict_compiled(images)))
        > 100 * loader.XLA_TOLERANCE
    )

    other = loader.load(str(other_path), "tiny", 3, xla_sizes=(1,))
    other.warm_up([1])
    assert other.wait_compiled(120)
    assert other._program is not program and sorted(other.xla_timings) == [1]
    np.testing.assert_allclose(
        other.predict_compiled(images[:1]), other.predict_plain(images[:1]), atol=loader.XLA_TOLERANCE
    )
    for model in (new, old_again, other):
        model.release()
