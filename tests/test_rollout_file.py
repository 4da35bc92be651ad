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
