"""Confusion-matrix metrics against independent references (numpy loops, torchmetrics)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch

from segtune.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, iou_per_class
from segtune.training.metrics import (
    ConfusionMatrix,
    band_target,
    boundary_band,
    per_image_rows,
)

C = NUM_CLASSES
HW = (48, 64)


def random_batches(
    seed: int = 0, n_batches: int = 4, batch: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Targets from classes {0, 2, 3} with ~15% ignored pixels, predictions from {0, 1, 2, 3}.

    Class 1 is predicted but never true (IoU 0, counts), classes 4..7 appear nowhere (NaN).
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        target = rng.choice([0, 2, 3], size=(batch, *HW))
        target[rng.random(target.shape) < 0.15] = IGNORE_INDEX
        pred = rng.integers(0, 4, size=(batch, *HW))
        # bias predictions towards the truth so IoUs are not all alike
        agree = (rng.random(target.shape) < 0.5) & (target != IGNORE_INDEX)
        pred[agree] = target[agree]
        out.append((torch.from_numpy(pred), torch.from_numpy(target)))
    return out


def reference_matrix(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Confusion matrix by np.add.at over the labelled pixels (rows = truth)."""
    m = np.zeros((C, C), dtype=np.int64)
    for pred, target in pairs:
        p, t = pred.numpy().ravel(), target.numpy().ravel()
        keep = t != IGNORE_INDEX
        np.add.at(m, (t[keep], p[keep]), 1)
    return m


def reference_scores(m: np.ndarray) -> dict[str, float]:
    """The documented convention written out class by class."""
    ious, recalls = [], []
    for c in range(C):
        tp, fp, fn = m[c, c], m[:, c].sum() - m[c, c], m[c, :].sum() - m[c, c]
        ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan)
        if m[c, :].sum() > 0:
            recalls.append(tp / m[c, :].sum())
    defined = [v for v in ious if not math.isnan(v)]
    return {
        "miou": sum(defined) / len(defined) if defined else math.nan,
        "acc": np.trace(m) / m.sum() if m.sum() else math.nan,
        "class_acc": sum(recalls) / len(recalls) if recalls else math.nan,
        **{f"iou_{name}": v for name, v in zip(CLASS_NAMES, ious, strict=True)},
    }


def assert_scores_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_matrix_and_scores_match_numpy_reference_over_batches() -> None:
    pairs = random_batches()
    cm = ConfusionMatrix()
    for pred, target in pairs:
        cm.update(pred, target)
    m = reference_matrix(pairs)
    assert cm.matrix.dtype == torch.int64
    np.testing.assert_array_equal(cm.to_numpy(), m)
    scores = cm.compute()
    want = reference_scores(m)
    assert_scores_equal(scores, want)
    # the convention in numbers: class 1 predicted, never true -> 0 and counted; 4..7 -> NaN
    assert scores["iou_building"] == 0.0
    assert all(math.isnan(scores[f"iou_{n}"]) for n in CLASS_NAMES[4:])
    assert scores["miou"] == pytest.approx(
        np.mean([scores[f"iou_{n}"] for n in CLASS_NAMES[:4]]), abs=1e-12
    )
    # class accuracy is over the three classes with ground truth only
    m64 = m.astype(np.float64)
    assert scores["class_acc"] == pytest.approx(
        np.mean([m64[c, c] / m64[c].sum() for c in (0, 2, 3)]), abs=1e-12
    )


def test_logits_give_the_same_matrix_as_their_argmax() -> None:
    (pred, target), *_ = random_batches(seed=1, n_batches=1)
    logits = torch.nn.functional.one_hot(pred, C).permute(0, 3, 1, 2).float() * 3.0
    logits += torch.rand(logits.shape)  # ties impossible: the one-hot margin is 3 > 1
    from_logits, from_ids = ConfusionMatrix(), ConfusionMatrix()
    from_logits.update(logits, target.to(torch.uint8))
    from_ids.update(pred, target)
    assert torch.equal(from_logits.matrix, from_ids.matrix)


def test_matches_torchmetrics_where_defined() -> None:
    tm = pytest.importorskip("torchmetrics.classification")
    pairs = random_batches(seed=2)
    cm = ConfusionMatrix()
    kwargs = {"num_classes": C, "ignore_index": IGNORE_INDEX}
    tm_matrix = tm.MulticlassConfusionMatrix(**kwargs)
    tm_iou = tm.MulticlassJaccardIndex(average=None, **kwargs)
    tm_acc = tm.MulticlassAccuracy(average="micro", **kwargs)
    tm_recall = tm.MulticlassRecall(average=None, **kwargs)
    for pred, target in pairs:
        cm.update(pred, target)
        for metric in (tm_matrix, tm_iou, tm_acc, tm_recall):
            metric.update(pred, target)
    scores = cm.compute()
    assert torch.equal(cm.matrix, tm_matrix.compute().long())
    m = cm.to_numpy()
    union = m.sum(0) + m.sum(1) - np.diag(m)
    ref_iou = tm_iou.compute().double().numpy()
    ours = np.array([scores[f"iou_{n}"] for n in CLASS_NAMES])
    np.testing.assert_allclose(ours[union > 0], ref_iou[union > 0], atol=1e-6)
    assert np.isnan(ours[union == 0]).all()
    assert scores["miou"] == pytest.approx(ref_iou[union > 0].mean(), abs=1e-6)
    assert scores["acc"] == pytest.approx(tm_acc.compute().item(), abs=1e-6)
    recall = tm_recall.compute().double().numpy()
    assert scores["class_acc"] == pytest.approx(recall[m.sum(1) > 0].mean(), abs=1e-6)


def test_all_pixels_ignored_gives_nan_without_crashing() -> None:
    target = torch.full((2, *HW), IGNORE_INDEX)
    pred = torch.randint(0, C, (2, *HW))
    cm = ConfusionMatrix()
    cm.update(pred, target)
    assert int(cm.matrix.sum()) == 0
    scores = cm.compute()
    assert all(math.isnan(v) for v in scores.values())
    rows = per_image_rows(pred, target, ["a", "b"])
    assert [r["id"] for r in rows] == ["a", "b"]
    assert all(math.isnan(r["miou"]) for r in rows)
    # nothing updated at all behaves the same
    assert all(math.isnan(v) for v in ConfusionMatrix().compute().values())


def test_one_class_only() -> None:
    target = torch.full((1, *HW), 2)
    cm = ConfusionMatrix()
    cm.update(target.clone(), target)
    scores = cm.compute()
    assert scores["miou"] == scores["acc"] == scores["class_acc"] == scores["iou_road"] == 1.0
    assert sum(math.isnan(v) for v in scores.values()) == C - 1

    pred = target.clone()
    pred[0, :12] = 5  # a quarter of the rows predicted as vehicle
    cm.reset()
    assert int(cm.matrix.sum()) == 0
    cm.update(pred, target)
    scores = cm.compute()
    assert scores["iou_road"] == pytest.approx(0.75)
    assert scores["iou_vehicle"] == 0.0
    assert scores["miou"] == pytest.approx(0.375)
    assert scores["acc"] == scores["class_acc"] == pytest.approx(0.75)


def test_per_image_rows_match_single_image_matrices() -> None:
    pairs = random_batches(seed=3, n_batches=1, batch=5)
    pred, target = pairs[0]
    target[4] = IGNORE_INDEX  # one image without labelled pixels
    target[3] = 0  # one image of a single class
    ids = [f"img{i}" for i in range(5)]
    rows = per_image_rows(pred, target, ids)
    assert [r["id"] for r in rows] == ids
    for i, row in enumerate(rows):
        single = ConfusionMatrix()
        single.update(pred[i : i + 1], target[i : i + 1])
        want = single.compute()
        assert set(row) == {"id", "miou", *(f"iou_{n}" for n in CLASS_NAMES)}
        assert_scores_equal(
            {k: v for k, v in row.items() if k != "id"},
            {k: v for k, v in want.items() if k == "miou" or k.startswith("iou_")},
        )
    assert math.isnan(rows[4]["miou"])
    # logits are accepted as well
    logits = torch.nn.functional.one_hot(pred, C).permute(0, 3, 1, 2).float()
    pd.testing.assert_frame_equal(
        pd.DataFrame(per_image_rows(logits, target, ids)), pd.DataFrame(rows)
    )


def test_dataframe_and_csv() -> None:
    pairs = random_batches(seed=4, n_batches=1)
    cm = ConfusionMatrix()
    cm.update(*pairs[0])
    frame = cm.to_dataframe()
    assert list(frame.index) == list(frame.columns) == list(CLASS_NAMES)
    np.testing.assert_array_equal(frame.to_numpy(), cm.to_numpy())
    back = pd.read_csv(io.StringIO(frame.to_csv()), index_col=0)
    np.testing.assert_array_equal(back.to_numpy(), cm.to_numpy())
    assert back.index.name == "true"


def test_iou_per_class_batched() -> None:
    m = np.array([[[3, 1], [0, 0]], [[0, 0], [0, 0]]])
    iou = iou_per_class(m)
    np.testing.assert_allclose(iou[0], [0.75, 0.0])
    assert np.isnan(iou[1]).all()


def test_invalid_inputs_raise() -> None:
    cm = ConfusionMatrix()
    target = torch.zeros((1, *HW), dtype=torch.long)
    with pytest.raises(ValueError, match="do not match"):
        cm.update(torch.zeros((1, 8, 8), dtype=torch.long), target)
    bad = target.clone()
    bad[0, 0, 0] = 9
    cm.update(target, bad)  # counted without a GPU sync; the split's result is refused
    assert int(cm.matrix.sum()) == HW[0] * HW[1] - 1  # the bad pixel is in no cell
    with pytest.raises(ValueError, match="1 pixels have class ids outside 0..7"):
        cm.compute()
    cm.reset()
    cm.compute()  # reset forgets the bad pixel too
    with pytest.raises(ValueError, match="1 pixels have class ids outside"):
        per_image_rows(target, bad, ["a"])
    with pytest.raises(ValueError, match="2 ids"):
        per_image_rows(target, target, ["a", "b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accumulates_on_the_cuda_device() -> None:
    pairs = random_batches(seed=5)
    cm = ConfusionMatrix(device="cuda")
    for pred, target in pairs:
        cm.update(pred.cuda(), target.cuda())
    assert cm.matrix.device.type == "cuda"
    np.testing.assert_array_equal(cm.to_numpy(), reference_matrix(pairs))
    pred, target = pairs[0]
    pd.testing.assert_frame_equal(
        pd.DataFrame(per_image_rows(pred.cuda(), target.cuda(), ["a", "b", "c"])),
        pd.DataFrame(per_image_rows(pred, target, ["a", "b", "c"])),
    )


def test_boundary_band_and_its_miou_by_hand() -> None:
    """Two halves, class 0 | class 1, 6 x 6; the prediction puts the border one column right.
    Whole image: IoU 0 = 18 / 24, IoU 1 = 12 / 18. Band of width 1 (columns 2 and 3): truth 0
    predicted 0 in column 2 (6 px), truth 1 predicted 0 in column 3 (6 px): IoU 0 = 6 / 12,
    IoU 1 = 0 / 6, boundary mIoU 0.25."""
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[:, :, 3:] = 1
    pred = torch.zeros_like(target)
    pred[:, :, 4:] = 1
    band = boundary_band(target, width=1)
    assert band[0].any(0).tolist() == [False, False, True, True, False, False]
    assert band[0].all(0).tolist() == [False, False, True, True, False, False]
    assert boundary_band(target, width=2)[0, 0].tolist() == [False, True, True, True, True, False]
    whole, edge = ConfusionMatrix(("a", "b")), ConfusionMatrix(("a", "b"))
    whole.update(pred, target)
    edge.update(pred, band_target(target, width=1))
    assert whole.compute()["miou"] == pytest.approx((18 / 24 + 12 / 18) / 2)
    assert edge.compute()["iou_a"] == pytest.approx(0.5)
    assert edge.compute()["iou_b"] == 0.0
    assert edge.compute()["miou"] == pytest.approx(0.25)
    assert int(edge.matrix.sum()) == 12


def test_ignored_pixels_make_no_boundary() -> None:
    """A column of ignored pixels is no class: alone it makes no band; between two classes it
    hides their border from a band of width 1, not of width 2; it is never in the band."""
    target = torch.zeros(1, 5, 6, dtype=torch.long)
    target[:, :, 2] = IGNORE_INDEX
    assert not boundary_band(target, width=1).any()
    target[:, :, 3:] = 1
    assert not boundary_band(target, width=1).any()
    band = boundary_band(target, width=2)[0, 0].tolist()
    assert band == [False, True, False, True, False, False]
    with pytest.raises(ValueError, match="at least 1"):
        boundary_band(target, width=0)
