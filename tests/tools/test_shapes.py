"""The shapes data set and its checker: the checker must read clean (and mildly degraded) generator pictures
right, and refuse pictures that show nothing, so a recognition rate on a model's outputs means something."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edgediff.errors import InputError
from edgediff.tools.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    Label,
    ShapeChecker,
    all_labels,
    dataset,
    draw,
    parse_caption,
)


@pytest.fixture(scope="module")
def checker() -> ShapeChecker:
    return ShapeChecker()


def test_dataset_is_deterministic_and_balanced():
    a, caps_a, labels = dataset(120, seed=3)
    b, caps_b, _ = dataset(120, seed=3)
    c, _, _ = dataset(120, seed=4)
    assert a.shape == (120, 32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert caps_a == caps_b
    assert not np.array_equal(a, c)
    assert len(all_labels()) == len(COLORS) * len(SHAPES) * len(POSITIONS) == 60
    assert {lab for lab in labels} == set(all_labels())
    # some captions leave the position out, and every caption parses back to its picture's label
    assert any(parse_caption(cap).position is None for cap in caps_a)
    for cap, lab in zip(caps_a, labels, strict=True):
        want = parse_caption(cap)
        assert (want.color, want.shape) == (lab.color, lab.shape)
        assert want.position in (None, lab.position)


def test_checker_reads_clean_pictures(checker):
    # a seed the checker was not fitted on
    images, _, labels = dataset(600, seed=7)
    got = [checker.read(im) for im in images]
    assert got == labels


def test_checker_reads_canonical_and_uint8_pictures(checker):
    for label in all_labels():
        image = draw(label)
        assert checker.read(image) == label
        assert checker.matches((image * 255).astype(np.uint8), label.caption())


def test_checker_tolerates_blur_and_noise(checker):
    # a decoder's output is a little soft and noisy; the reading must not hinge on crisp edges
    images, _, labels = dataset(180, seed=11)
    rng = np.random.default_rng(0)
    right = 0
    for image, label in zip(images, labels, strict=True):
        pil = Image.fromarray((image * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
        soft = np.asarray(pil, dtype=np.float32) / 255 + rng.normal(0, 0.03, image.shape).astype(np.float32)
        right += checker.read(np.clip(soft, 0, 1)) == label
    assert right / len(images) >= 0.97


def test_checker_refuses_wrong_and_empty_pictures(checker):
    red_circle = draw(Label("red", "circle", "top left"))
    assert checker.matches(red_circle, "a red circle at the top left")
    assert checker.matches(red_circle, "a red circle")
    assert not checker.matches(red_circle, "a blue circle at the top left")
    assert not checker.matches(red_circle, "a red square at the top left")
    assert not checker.matches(red_circle, "a red circle at the bottom right")
    blank = np.full((32, 32, 3), 0.08, dtype=np.float32)
    assert checker.read(blank) is None
    gray = draw(Label("red", "square", "center")).mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    assert checker.read(gray) is None  # a shape with no color is not any of the prompts
    noise = np.random.default_rng(1).uniform(0, 1, (32, 32, 3)).astype(np.float32)
    assert checker.recognition_rate([noise] * 3, ["a red circle", "a blue square", "a green triangle"]) < 1


def test_parse_caption():
    assert parse_caption("a yellow triangle in the center") == Label("yellow", "triangle", "center")
    assert parse_caption("A Blue Square") == Label("blue", "square", None)
    assert Label("green", "circle", "bottom right").caption() == "a green circle at the bottom right"
    with pytest.raises(InputError, match="purple"):
        parse_caption("a purple circle")
    with pytest.raises(InputError, match="middle"):
        parse_caption("a red circle at the middle")
