from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config

from dafne_node.model.architectures import build_model
from dafne_node.model.infer import Segmenter, resolve_precision
from dafne_node.model.train import TrainingExample, _fold_contrast, evaluate, train
from dafne_node.phantom.sites import T1_SIGNALS


def _examples(synthetic_volume, seeds) -> list[TrainingExample]:
    return [TrainingExample(*synthetic_volume(s, slices=4), pixel_spacing=(2.0, 2.0))
            for s in seeds]


def test_tiny_training_reduces_loss_and_learns(synthetic_volume, tiny_params,
                                               tiny_preprocessing) -> None:
    torch.manual_seed(0)
    model = build_model("unet2d-res", {**tiny_params, "base_channels": 8, "max_channels": 32,
                                       "groups": 4})
    examples = _examples(synthetic_volume, range(4))
    seg_before = Segmenter(model, tiny_preprocessing, precision="fp32")
    before = evaluate(seg_before, examples).mean_dice
    report = train(model, examples, preprocessing=tiny_preprocessing, steps=100, lr=3e-3,
                   batch_size=4, seed=0, augment=False, progress=False)
    assert report.steps == 100 and report.slices == 16
    assert report.final_loss < 0.75 * report.initial_loss
    assert not model.training
    after = evaluate(Segmenter(model, tiny_preprocessing, precision="fp32"),
                     examples)
    assert after.mean_dice > before + 0.3, (before, after.mean_dice)
    assert set(after.per_label) == {"soleus", "gastrocnemius_medial", "gastrocnemius_lateral",
                                    "tibialis_anterior", "extensor_digitorum_longus",
                                    "peroneus"}


def test_training_is_deterministic(synthetic_volume, tiny_params, tiny_preprocessing) -> None:
    examples = _examples(synthetic_volume, range(2))
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("unet2d-res", tiny_params)
        train(model, examples, preprocessing=tiny_preprocessing, steps=3, batch_size=2,
              seed=5, progress=False)
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6)


def test_train_argument_checks(synthetic_volume, tiny_params, tiny_preprocessing) -> None:
    model = build_model("unet2d-res", tiny_params)
    examples = _examples(synthetic_volume, [0])
    with pytest.raises(ValueError, match="exactly one"):
        train(model, examples, preprocessing=tiny_preprocessing, progress=False)
    with pytest.raises(ValueError, match="no training examples"):
        train(model, [], preprocessing=tiny_preprocessing, steps=1, progress=False)
    with pytest.raises(ValueError, match="same shape"):
        TrainingExample(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), (1.0, 1.0))


def test_epochs_counts_slices(synthetic_volume, tiny_params, tiny_preprocessing) -> None:
    model = build_model("unet2d-res", tiny_params)
    report = train(model, _examples(synthetic_volume, [0, 1]), preprocessing=tiny_preprocessing,
                   epochs=1, batch_size=3, progress=False)
    assert report.steps == 3  # ceil(8 slices / 3)


def test_contrast_fold_turns_t1_contrast_into_fat_suppressed_order() -> None:
    """Folding a T1 image darkens fat and marrow below muscle and keeps air dark, the tissue
    order of a Dixon water image (site C), whatever the drawn fold within its ranges."""
    t1 = {name: getattr(T1_SIGNALS, name) for name in ("air", "cortex", "muscle", "fat",
                                                        "marrow")}
    values = torch.tensor(list(t1.values())).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    folded = _fold_contrast(values, floor=torch.tensor([0.05, 0.1, 0.15]),
                            peak=torch.tensor([0.3, 0.42, 0.55]),
                            end=torch.tensor([0.0, 0.07, 0.15]))
    for row in folded.view(3, -1):
        after = dict(zip(t1, row.tolist(), strict=True))
        assert after["air"] == 0 and after["cortex"] == pytest.approx(t1["cortex"])
        assert after["muscle"] > max(after["fat"], after["marrow"]) + 0.25
        assert after["fat"] < 0.2
    assert float(folded.min()) >= 0 and float(folded.max()) <= 1


def test_contrast_fold_changes_training_repeatably(synthetic_volume, tiny_params,
                                                   tiny_preprocessing) -> None:
    examples = _examples(synthetic_volume, range(2))

    def trained(contrast_fold: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model = build_model("unet2d-res", tiny_params)
        train(model, examples, preprocessing=tiny_preprocessing, steps=3, batch_size=2,
              seed=5, contrast_fold=contrast_fold, progress=False)
        return model.state_dict()

    folded, again, plain = trained(1.0), trained(1.0), trained(0.0)
    assert all(torch.equal(folded[k], again[k]) for k in folded)
    assert any(not torch.equal(folded[k], plain[k]) for k in folded)
    with pytest.raises(ValueError, match="contrast_fold must be a probability"):
        train(build_model("unet2d-res", tiny_params), examples,
              preprocessing=tiny_preprocessing, steps=1, contrast_fold=1.5, progress=False)


def _train_tiny(examples, tiny_params, tiny_preprocessing, **options):
    """Five bf16 steps from fixed weights: (initial state, final state, report)."""
    torch.manual_seed(3)
    model = build_model("unet2d-res", tiny_params)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    report = train(model, examples, preprocessing=tiny_preprocessing, steps=5, batch_size=2,
                   seed=5, progress=False, threads=1, precision="bf16", **options)
    return initial, model.state_dict(), report


def _mean_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([(a[k] - b[k]).abs().flatten() for k in a
                            if a[k].is_floating_point()]).mean())


needs_bf16 = pytest.mark.skipif(resolve_precision("auto") != "bf16",
                                reason="compiling applies to bf16 training; this CPU has no bf16")


@needs_bf16
def test_compiled_training_reaches_the_weights_of_uncompiled_training(
        synthetic_volume, tiny_params, tiny_preprocessing) -> None:
    """Same losses step by step; the weights differ by bf16 rounding, not by their updates."""
    examples = _examples(synthetic_volume, range(2))
    initial, plain, plain_report = _train_tiny(examples, tiny_params, tiny_preprocessing)
    _, compiled, report = _train_tiny(examples, tiny_params, tiny_preprocessing,
                                      compile_model=True)
    assert compiled.keys() == plain.keys()  # no compiler wrapper in the saved names
    np.testing.assert_allclose(report.loss_history, plain_report.loss_history, rtol=2e-3)
    assert _mean_abs(compiled, plain) < 0.2 * _mean_abs(plain, initial)


@needs_bf16
def test_a_network_that_cannot_be_compiled_trains_uncompiled(
        synthetic_volume, tiny_params, tiny_preprocessing, monkeypatch, tmp_path,
        caplog) -> None:
    """A node without a working C++ compiler still trains, to the same weights."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (str(tmp_path / "no-such-c++"),))
    examples = _examples(synthetic_volume, range(2))
    _, plain, _ = _train_tiny(examples, tiny_params, tiny_preprocessing)
    torch._dynamo.reset()
    _, fallback, _ = _train_tiny(examples, tiny_params, tiny_preprocessing, compile_model=True)
    assert "training it uncompiled" in caplog.text
    for name in plain:
        torch.testing.assert_close(fallback[name], plain[name], rtol=0, atol=0)
