"""``runs.jsonl`` is strict JSON and keeps non-finite numbers through a round trip."""

import json
import math

import pytest

from torchsingd.experiments.store import RunStore, json_safe


def _strict(line: str):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def test_non_finite_numbers_round_trip_as_strict_json(tmp_path):
    record = {
        "key": "a",
        "test_loss": math.nan,
        "train_loss": math.inf,
        "history": [{"epoch": 1, "test_loss": -math.inf, "seconds": 0.5}],
        "message": "fine",
    }
    RunStore(tmp_path).add(record)
    (line,) = (tmp_path / "runs.jsonl").read_text().splitlines()
    stored = _strict(line)  # no bare NaN / Infinity
    assert stored["test_loss"] == "NaN" and stored["train_loss"] == "Infinity"
    assert stored["history"][0]["test_loss"] == "-Infinity"
    back = RunStore(tmp_path).get("a")
    assert math.isnan(back["test_loss"]) and back["train_loss"] == math.inf
    assert back["history"][0]["test_loss"] == -math.inf
    assert back["history"][0]["seconds"] == 0.5 and back["message"] == "fine"


def test_lines_of_earlier_versions_with_bare_nan_still_load(tmp_path):
    (tmp_path / "runs.jsonl").write_text('{"key": "b", "test_loss": NaN, "lr": 0.1}\n')
    back = RunStore(tmp_path).get("b")
    assert math.isnan(back["test_loss"]) and back["lr"] == 0.1


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_json_safe_writes_null(value):
    out = json_safe({"x": [1.0, value, {"y": value}], "z": (value,)})
    assert out == {"x": [1.0, None, {"y": None}], "z": [None]}
    json.dumps(out, allow_nan=False)
