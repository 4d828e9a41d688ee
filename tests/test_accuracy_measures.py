"""The held-out measures of handlers/accuracy.py on rows whose answer is known by construction: class maps that
differ in a known share of pixels, and detections matched by label and overlap."""

from __future__ import annotations

import pytest
import torch

from handlers.accuracy import Bound, HeldOut, detection_f1, min_cosine, pixel_agreement, top1_agreement


def detections(*rows: tuple[float, float, float, float, float, int]) -> torch.Tensor:
    return torch.tensor([list(r) for r in rows], dtype=torch.float32).reshape(-1, 6)


def test_pixel_agreement_is_the_share_of_equal_pixels_over_all_maps() -> None:
    first, second = torch.zeros(4, 5, dtype=torch.uint8), torch.ones(2, 10, dtype=torch.uint8)
    served_first = first.clone()
    served_first[0, :3] = 7  # 3 of 20 pixels differ
    served_second = second.clone()
    served_second[1, :2] = 0  # 2 of 20
    assert pixel_agreement([first, second], [served_first, served_second]) == pytest.approx(35 / 40)
    assert pixel_agreement([first], [first]) == 1.0


def test_detection_f1_matches_by_label_and_overlap() -> None:
    reference = detections((0, 0, 10, 10, 0.9, 1), (20, 20, 40, 40, 0.8, 2))
    assert detection_f1([reference], [reference]) == 1.0
    shifted = detections((1, 1, 11, 11, 0.91, 1), (20, 20, 40, 40, 0.79, 2))  # IoU 0.68 and 1: both match
    assert detection_f1([reference], [shifted]) == 1.0
    relabelled = detections((0, 0, 10, 10, 0.9, 3), (20, 20, 40, 40, 0.8, 2))  # one label changed
    assert detection_f1([reference], [relabelled]) == pytest.approx(0.5)
    moved = detections((6, 6, 16, 16, 0.9, 1), (20, 20, 40, 40, 0.8, 2))  # IoU 16/184: no match
    assert detection_f1([reference], [moved]) == pytest.approx(0.5)
    extra = detections((0, 0, 10, 10, 0.9, 1), (20, 20, 40, 40, 0.8, 2), (50, 50, 60, 60, 0.5, 1))
    assert detection_f1([reference], [extra]) == pytest.approx(4 / 5)
    empty = detections()
    assert detection_f1([empty, reference], [empty, empty]) == pytest.approx(0.5)  # the mean over the images


def test_one_served_detection_matches_one_reference_detection() -> None:
    """Two served boxes over one reference box: one match, not two."""
    reference = detections((0, 0, 10, 10, 0.9, 1))
    doubled = detections((0, 0, 10, 10, 0.9, 1), (0, 0, 10, 10, 0.8, 1))
    assert detection_f1([reference], [doubled]) == pytest.approx(2 / 3)


def test_row_measures_and_the_verdict() -> None:
    reference = [torch.tensor([0.1, 0.9]), torch.tensor([0.8, 0.2])]
    assert top1_agreement(reference, [torch.tensor([0.2, 0.8]), torch.tensor([0.1, 0.9])]) == 0.5
    assert min_cosine(reference, reference) == pytest.approx(1.0)
    heldout = HeldOut(Bound("top1_agreement", 0.9), [{}, {}])
    verdict = heldout.verdict(reference, [torch.tensor([0.2, 0.8]), torch.tensor([0.1, 0.9])])
    assert not verdict.within and verdict.inputs == 2
    with pytest.raises(ValueError, match="1 rows served for 2 held-out inputs"):
        heldout.verdict(reference, reference[:1])
