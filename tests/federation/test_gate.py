"""The validation gate: the promotion rules, scoring weights, and the validation set files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dafne_node.model.architectures import build_model
from dafne_node.model.manifest import default_model_dir, load_model_dir
from dafne_node.phantom import make_study
from federation.gate import (
    AbsoluteGate,
    Gate,
    RelativeGate,
    Scores,
    make_gate,
    score_state,
)
from federation.validation import (
    VALIDATION_ARRAYS,
    ValidationCase,
    load_validation_set,
    make_validation_set,
)

CURRENT = Scores(mean=0.812, sites={"A": 0.90, "B": 0.80, "C": 0.78, "D": 0.768})


def _with(scores: Scores, mean: float | None = None, **sites: float) -> Scores:
    return Scores(mean=scores.mean if mean is None else mean, sites={**scores.sites, **sites})


# -- the rules ---------------------------------------------------------------------------------

def test_relative_gate_promotes_an_improvement_naming_the_figures() -> None:
    decision = RelativeGate().decide(CURRENT, _with(CURRENT, 0.815, B=0.81))
    assert decision.promote
    assert decision.reason == ("mean Dice 0.812 -> 0.815 (+0.003 within 0.010 allowed); "
                               "worst site A Dice 0.900 -> 0.900 (+0.000 within 0.030 allowed)")


def test_relative_gate_rejects_a_mean_drop_with_the_figures() -> None:
    decision = RelativeGate().decide(CURRENT, _with(CURRENT, 0.790))
    assert not decision.promote
    assert decision.reason == "mean Dice 0.812 -> 0.790 (-0.022 > 0.010 allowed)"


def test_relative_gate_rejects_one_site_dropping_even_if_the_mean_rises() -> None:
    decision = RelativeGate().decide(CURRENT, _with(CURRENT, 0.830, C=0.70, A=0.95))
    assert not decision.promote
    assert decision.reason == "site C Dice 0.780 -> 0.700 (-0.080 > 0.030 allowed)"


def test_relative_gate_names_every_failure() -> None:
    decision = RelativeGate().decide(CURRENT, _with(CURRENT, 0.70, B=0.70, D=0.70))
    assert not decision.promote
    assert decision.reason.split("; ") == [
        "mean Dice 0.812 -> 0.700 (-0.112 > 0.010 allowed)",
        "site B Dice 0.800 -> 0.700 (-0.100 > 0.030 allowed)",
        "site D Dice 0.768 -> 0.700 (-0.068 > 0.030 allowed)",
    ]


def test_relative_gate_boundaries_are_inclusive() -> None:
    gate = RelativeGate(max_mean_drop=0.01, max_site_drop=0.03)
    # Exactly the allowance passes, although 0.812 - 0.802 is 0.010000000000000009 in floats.
    assert 0.812 - 0.802 > 0.01
    at_limit = _with(CURRENT, 0.802, A=0.87, B=0.77, C=0.75, D=0.738)
    decision = gate.decide(CURRENT, at_limit)
    assert decision.promote, decision.reason
    assert decision.reason.startswith("mean Dice 0.812 -> 0.802 (-0.010 within 0.010 allowed)")

    just_over_mean = gate.decide(CURRENT, _with(at_limit, 0.8019))
    assert not just_over_mean.promote
    assert just_over_mean.reason == "mean Dice 0.8120 -> 0.8019 (-0.0101 > 0.0100 allowed)"

    just_over_site = gate.decide(CURRENT, _with(at_limit, A=0.8699))
    assert not just_over_site.promote
    assert just_over_site.reason == "site A Dice 0.9000 -> 0.8699 (-0.0301 > 0.0300 allowed)"


def test_relative_gate_zero_allowance_accepts_equal_and_rejects_any_loss() -> None:
    gate = RelativeGate(max_mean_drop=0.0, max_site_drop=0.0)
    assert gate.decide(CURRENT, CURRENT).promote
    decision = gate.decide(CURRENT, _with(CURRENT, 0.8119))
    assert not decision.promote
    assert decision.reason == "mean Dice 0.8120 -> 0.8119 (-0.0001 > 0.0000 allowed)"


def test_relative_gate_rejects_missing_sites_and_nan() -> None:
    gate = RelativeGate()
    without_d = Scores(mean=0.9, sites={"A": 0.9, "B": 0.9, "C": 0.9})
    decision = gate.decide(CURRENT, without_d)
    assert not decision.promote
    assert decision.reason == "site D has a current score but no candidate score"

    decision = gate.decide(without_d, CURRENT)
    assert not decision.promote
    assert decision.reason == ("site D has a candidate score but no current score "
                               "(the validation set changed)")

    decision = gate.decide(CURRENT, _with(CURRENT, float("nan")))
    assert not decision.promote
    assert decision.reason == "candidate mean Dice is not a number (no label was scored)"

    decision = gate.decide(CURRENT, _with(CURRENT, B=float("nan")))
    assert not decision.promote
    assert decision.reason == "site B Dice 0.800 -> nan is not a number"


def test_absolute_gate_is_dafnes_rule_and_rejects_nothing_scored() -> None:
    gate = AbsoluteGate()
    assert gate.min_dice == -0.001
    for mean in (0.0, 0.05, 0.99):
        decision = gate.decide(CURRENT, _with(CURRENT, mean, A=0.0, B=0.0, C=0.0, D=0.0))
        assert decision.promote
    assert gate.decide(CURRENT, _with(CURRENT, 0.0)).reason == "mean Dice 0.000 >= -0.001 required"
    assert not gate.decide(CURRENT, _with(CURRENT, float("nan"))).promote

    floor = AbsoluteGate(min_dice=0.8)
    assert floor.decide(CURRENT, _with(CURRENT, 0.8)).promote
    decision = floor.decide(CURRENT, _with(CURRENT, 0.7999))
    assert not decision.promote
    assert decision.reason == "mean Dice 0.7999 < 0.8000 required"


def test_make_gate_by_name_with_options() -> None:
    relative = make_gate("relative", max_mean_drop=0.02)
    assert isinstance(relative, RelativeGate) and isinstance(relative, Gate)
    assert (relative.max_mean_drop, relative.max_site_drop) == (0.02, 0.03)
    absolute = make_gate("absolute", min_dice=0.5)
    assert isinstance(absolute, AbsoluteGate) and absolute.min_dice == 0.5
    with pytest.raises(ValueError, match="unknown gate 'fedavg'; choose one of absolute, relative"):
        make_gate("fedavg")
    with pytest.raises(ValueError, match=r"gate 'relative'.*'min_dice'"):
        make_gate("relative", min_dice=0.5)
    with pytest.raises(ValueError, match="max_site_drop must be a finite number >= 0"):
        make_gate("relative", max_site_drop=-0.1)
    with pytest.raises(ValueError, match="min_dice must be a finite number"):
        AbsoluteGate(min_dice=float("nan"))


def test_scores_json_round_trip() -> None:
    scores = Scores(mean=0.8125, sites={"C": 0.75, "A": 0.875})
    data = scores.to_json()
    assert data == {"mean": 0.8125, "sites": {"A": 0.875, "C": 0.75}}
    assert list(data["sites"]) == ["A", "C"]
    assert Scores.from_json(json.loads(json.dumps(data))) == scores

    with_nan = Scores(mean=float("nan"), sites={"A": float("nan")}).to_json()
    assert json.dumps(with_nan, allow_nan=False) == '{"mean": null, "sites": {"A": null}}'
    back = Scores.from_json(with_nan)
    assert math.isnan(back.mean) and math.isnan(back.sites["A"])

    for bad in ({"mean": 0.5}, {"mean": "high", "sites": {}}, {"mean": 0.5, "sites": [1]},
                {"mean": 0.5, "sites": {"A": True}}, [0.5]):
        with pytest.raises(ValueError, match="scores"):
            Scores.from_json(bad)  # type: ignore[arg-type]


# -- the validation set ------------------------------------------------------------------------

def test_validation_set_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "validation"
    paths = make_validation_set(folder, sites=("C", "A"), per_site=2, slices=3)
    assert [p.name for p in paths] == ["site-C-0.npz", "site-C-1.npz", "site-A-0.npz",
                                       "site-A-1.npz"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)

    cases = load_validation_set(folder)
    assert [c.name for c in cases] == ["site-A-0", "site-A-1", "site-C-0", "site-C-1"]
    assert [c.site for c in cases] == ["A", "A", "C", "C"]
    study = make_study(site="C", seed=90_001, slices=3)
    case = cases[3]
    assert isinstance(case, ValidationCase)
    np.testing.assert_array_equal(case.example.pixels, study.pixels)
    np.testing.assert_array_equal(case.example.labels, study.labels)
    assert case.example.pixel_spacing == tuple(study.pixel_spacing)
    assert case.example.pixels.dtype == study.pixels.dtype
    # Different subjects, not the same phantom twice.
    assert not np.array_equal(cases[0].example.labels, cases[1].example.labels)

    with pytest.raises(ValueError, match=r"already holds 4 \.npz files"):
        make_validation_set(folder, sites=("A",), per_site=1, slices=3)
    with np.load(paths[0], allow_pickle=False) as data:
        assert sorted(data.files) == sorted(VALIDATION_ARRAYS)
        assert str(data["site"]) == "C"


def _write_case(path: Path, **arrays: np.ndarray) -> None:
    base = {"pixels": np.zeros((2, 8, 8), np.uint16), "labels": np.zeros((2, 8, 8), np.uint8),
            "pixel_spacing": np.array([1.0, 1.0]), "site": np.asarray("A")}
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(("arrays", "message"), [
    ({"labels": None}, "lacks the arrays labels"),
    ({"labels": None, "site": None}, "lacks the arrays labels, site"),
    ({"labels": np.zeros((2, 8, 9), np.uint8)}, "must be non-empty volumes of the same shape"),
    ({"pixels": np.zeros((8, 8)), "labels": np.zeros((8, 8))}, "same shape"),
    ({"pixels": np.zeros((0, 8, 8)), "labels": np.zeros((0, 8, 8), np.uint8)}, "non-empty"),
    ({"labels": np.zeros((2, 8, 8), np.float32)}, "labels unsigned or signed integers"),
    ({"pixel_spacing": np.array([1.0, 1.0, 3.0])}, "pixel_spacing must be 2 numbers"),
    ({"pixel_spacing": np.array([0.0, 1.0])}, "pixel_spacing must be positive"),
    ({"pixel_spacing": np.array([np.nan, 1.0])}, "pixel_spacing must be positive"),
    ({"site": np.asarray(["A", "B"])}, "site must be a non-empty string"),
    ({"site": np.asarray(3)}, "site must be a non-empty string"),
])
def test_bad_validation_files_are_refused_naming_the_file(
        tmp_path: Path, arrays: dict[str, np.ndarray | None], message: str) -> None:
    _write_case(tmp_path / "good.npz")
    bad = tmp_path / "bad.npz"
    _write_case(bad, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_validation_set(tmp_path)
    assert str(bad) in str(info.value)


def test_unreadable_pickled_and_empty_sets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_validation_set(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("no cases here")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} holds no .npz cases")):
        load_validation_set(tmp_path)

    truncated = tmp_path / "truncated.npz"
    _write_case(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{truncated} is not a readable .npz file")):
        load_validation_set(tmp_path)
    truncated.unlink()

    pickled = tmp_path / "pickled.npz"
    _write_case(pickled, site=np.array([{"site": "A"}], dtype=object))
    with pytest.raises(ValueError, match=re.escape(
            f"{pickled} is not a readable .npz file without pickled objects")):
        load_validation_set(tmp_path)
    pickled.unlink()

    single = tmp_path / "single.npz"
    np.save(single.with_suffix(".npy"), np.zeros(3))
    single.with_suffix(".npy").rename(single)
    with pytest.raises(ValueError, match=re.escape(f"{single} holds a single array")):
        load_validation_set(tmp_path)


# -- scoring -----------------------------------------------------------------------------------

def test_score_state_ranks_the_bundled_model_above_random_weights(tmp_path: Path) -> None:
    make_validation_set(tmp_path, sites=("A", "C"), per_site=1, slices=8)
    cases = load_validation_set(tmp_path)
    loaded = load_model_dir(default_model_dir())
    manifest = loaded.manifest

    trained = score_state(manifest, loaded.model.state_dict(), cases)
    torch.manual_seed(0)
    random_net = build_model(manifest.architecture.id, manifest.architecture.params)
    untrained = score_state(manifest, random_net.state_dict(), cases)

    assert set(trained.sites) == set(untrained.sites) == {"A", "C"}
    assert trained.mean == pytest.approx((trained.sites["A"] + trained.sites["C"]) / 2)
    # The bundled model was trained on site A (T1w) and fails on site C (Dixon water): the
    # domain shift the federation has to close, and why the gate looks at every site.
    assert trained.sites["A"] > 0.9
    assert trained.sites["C"] < 0.2
    assert untrained.sites["A"] < 0.2 and untrained.mean < 0.2
    assert trained.mean > untrained.mean + 0.3
    # fp32 scoring is deterministic: the same weights give the same figures.
    assert score_state(manifest, loaded.model.state_dict(), cases[:1]).mean == (
        pytest.approx(trained.sites["A"], abs=1e-12))
    assert RelativeGate().decide(trained, untrained).promote is False
    assert RelativeGate().decide(untrained, trained).promote is True


def test_score_state_refuses_weights_that_do_not_fit_and_empty_sets(tmp_path: Path) -> None:
    loaded = load_model_dir(default_model_dir())
    state = dict(loaded.model.state_dict())
    state.pop(next(iter(state)))
    make_validation_set(tmp_path, sites=("A",), per_site=1, slices=1)
    cases = load_validation_set(tmp_path)
    with pytest.raises(ValueError, match="do not fit architecture 'unet2d-res'"):
        score_state(loaded.manifest, state, cases)
    with pytest.raises(ValueError, match="empty validation set"):
        score_state(loaded.manifest, loaded.model.state_dict(), [])
