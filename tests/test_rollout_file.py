"""The rollout file's schema (fovea.contract.rollout) and the server's routing rules, without a server."""

from __future__ import annotations

import json

import pytest
from fovea.contract import rollout as r


def test_valid_file_round_trips(tmp_path):
    data = {"labels": {"stable": 3, "canary": 4}, "traffic": {"stable": 90, "canary": 10},
            "shadow": {"version": 4, "share": 0.2}}  # fmt: skip
    parsed = r.validate(data)
    assert parsed.pinned_versions() == {3, 4}
    path = r.write(str(tmp_path), parsed)
    text = (tmp_path / "rollout.json").read_text()
    assert path == str(tmp_path / "rollout.json")
    assert r.parse(text) == parsed
    assert json.loads(text) == data
    assert [p.name for p in tmp_path.iterdir()] == ["rollout.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "JSON object"),
        ({"labels": {"stable": 0}}, "labels.stable"),
        ({"labels": {"3": 3}}, "not a valid name"),
        ({"labels": {"stable": 1}, "traffic": {"canary": 1}}, "does not define"),
        ({"labels": {"stable": 1}, "traffic": {"stable": -1}}, "non-negative"),
        ({"labels": {"stable": 1}, "traffic": {"stable": 0}}, "all 0"),
        ({"labels": {}, "shadow": {"version": 1, "share": 0}}, "shadow.share"),
        ({"lables": {}}, "unknown field"),
    ],
)
def test_invalid_files_name_the_field(data, message):
    with pytest.raises(r.RolloutError, match=message):
        r.validate(data)
    with pytest.raises(r.RolloutError, match="not valid JSON"):
        r.parse("{")


def test_routing_is_sticky_and_follows_the_shares():
    pytest.importorskip("prometheus_client", reason="the server extra is not installed")
    from fovea.server.rollout import bucket, pick

    traffic = {"stable": 90.0, "canary": 10.0}
    assert pick(traffic, 0.0) == "canary" and pick(traffic, 0.0999) == "canary"
    assert pick(traffic, 0.1) == "stable" and pick(traffic, 0.99999) == "stable"
    assert pick({"a": 0.0, "b": 1.0}, 0.0) == "b"
    assert bucket("user-1") == bucket("user-1") != bucket("user-2")
    points = [bucket(f"k{i}") for i in range(2000)]
    assert 0.4 < sum(p < 0.5 for p in points) / len(points) < 0.6


def _cli(*args: str) -> int:
    from fovea.cli import main

    return main(["rollout", *args])


def _published(tmp_path, versions=(1, 2, 3)):
    model = tmp_path / "demo"
    for v in versions:
        (model / str(v)).mkdir(parents=True)
        (model / str(v) / "saved_model.pb").write_bytes(b"")
    return model


def test_cli_writes_validates_and_promotes(tmp_path, capsys):
    model = _published(tmp_path)
    assert _cli(str(model), "--label", "stable=1", "--label", "canary=2", "--traffic", "stable=80,canary=20",
                "--shadow", "2:0.5") == 0  # fmt: skip
    written = r.parse((model / "rollout.json").read_text())
    assert written.labels == {"stable": 1, "canary": 2}
    assert written.traffic == {"stable": 80, "canary": 20}
    assert written.shadow == r.Shadow(2, 0.5)
    assert "canary       version 2     traffic 20.0%" in capsys.readouterr().out
    assert _cli(str(model), "--promote", "canary") == 0
    promoted = r.parse((model / "rollout.json").read_text())
    assert promoted.labels == {"stable": 2, "canary": 2} and promoted.traffic == {"stable": 100}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "canary=9"], "version 9 is not published"),
        (["--traffic", "blue=1"], "does not define"),
        (["--shadow", "2:3"], "shadow.share"),
        (["--promote", "nope"], "no such label"),
        (["--label", "canary"], "not LABEL=VALUE"),
    ],
)
def test_cli_refuses_a_bad_change_and_keeps_the_file(tmp_path, capsys, args, message):
    model = _published(tmp_path)
    assert _cli(str(model), "--label", "stable=1") == 0
    before = (model / "rollout.json").read_text()
    assert _cli(str(model), *args) != 0
    assert message in capsys.readouterr().err
    assert (model / "rollout.json").read_text() == before


def test_shadow_is_dropped_and_counted_while_live_work_is_queued():
    pytest.importorskip("prometheus_client", reason="the server extra is not installed")
    import asyncio
    import contextlib
    from types import SimpleNamespace

    import numpy as np
    from fovea.server.metrics import Metrics
    from fovea.server.rollout import run_shadow

    meta = SimpleNamespace(input_height=2, input_width=2, labels=["a", "b"])
    calls = []

    class Version:
        name, metadata = "m", meta

        def __init__(self, depth: int) -> None:
            self.queue_depth = depth

        @contextlib.contextmanager
        def leased(self):
            yield self

        async def infer(self, rows, deadline, low_priority=False, yield_to=None):
            calls.append(len(rows))
            return np.array([[0.2, 0.8]], np.float32)

    metrics = Metrics()
    live = np.array([[0.3, 0.7]], np.float32)
    for depth in (1, 0):
        shadow = Version(depth)
        manager = SimpleNamespace(lookup=lambda name, version, shadow=shadow: shadow)
        asyncio.run(run_shadow(metrics, manager, Version(0), 2, [np.zeros((2, 2, 3), np.uint8)], live))

    def value(name, **labels):
        return metrics.registry.get_sample_value(name, {"model": "m", "version": "2", **labels})

    assert calls == [1]  # the busy one never reached the model
    assert value("fovea_shadow_requests_total", outcome="dropped_busy") == 1
    assert value("fovea_shadow_requests_total", outcome="computed") == 1
    assert value("fovea_shadow_top1_equal_total") == 1
    assert value("fovea_shadow_score_abs_diff_sum_total") == pytest.approx(0.1)
    assert value("fovea_shadow_top1_pairs_total", live="b", shadow="b") == 1


def test_routing_skips_labels_whose_version_is_not_loaded():
    pytest.importorskip("prometheus_client", reason="the server extra is not installed")
    from fovea.server.metrics import Metrics
    from fovea.server.rollout import Rollouts

    rollouts = Rollouts(Metrics().rollout_file_errors)
    rollouts.update("m", b'{"labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 50, "canary": 50}}')
    assert {rollouts.route("m", f"k{i}", {1, 2}) for i in range(50)} == {"stable", "canary"}
    assert {rollouts.route("m", f"k{i}", {1}) for i in range(50)} == {"stable"}  # 2 still loading
    assert rollouts.route("m", None, {1, 2}) in ("stable", "canary")
    rollouts.update("m", b"{")  # invalid: the last good file stays
    assert rollouts.get("m").labels == {"stable": 1, "canary": 2}
    rollouts.update("m", None)  # removed: no rollout
    assert rollouts.route("m", "k", {1, 2}) == ""
