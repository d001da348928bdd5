"""A procedural text-to-image data set (colored shapes on a plain background) and an independent checker.

The trained demo model (``models/tiny-shapes-t2i``, made by ``scripts/train_tiny_t2i.py``) learns these
pictures, and tests look at what a compiled pipeline generates with :class:`ShapeChecker`. The checker never
sees a model's output while it is fitted: color is read from the hue of the foreground pixels, position from
the foreground's centroid, and shape from scale-invariant mask moments by a nearest-class-mean classifier
fitted on the generator's own images. numpy and PIL only (no torch), and deterministic: sample ``i`` of a
seed is always the same picture.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from edgediff.errors import InputError

SIZE = 32  # pixels; the model's VAE makes an 8x8 latent of it
SHAPES = ("circle", "square", "triangle")
# name -> (RGB in 0..1, hue in degrees)
COLORS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.80, 0.15),
    "blue": (0.12, 0.22, 0.95),
    "yellow": (0.95, 0.88, 0.10),
}
# name -> center as fractions of the image size (x, y)
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
BACKGROUND = (0.08, 0.08, 0.08)
RADIUS = 0.19  # a shape's half extent as a fraction of the size (6 px at 32)


@dataclass(frozen=True)
class Label:
    """What a picture shows (or what a prompt asks for): ``position`` None means anywhere."""

    color: str
    shape: str
    position: str | None = None

    def caption(self) -> str:
        where = ""
        if self.position == "center":
            where = " in the center"
        elif self.position is not None:
            where = f" at the {self.position}"
        return f"a {self.color} {self.shape}{where}"


def all_labels() -> list[Label]:
    """Every (color, shape, position) combination, in a fixed order."""
    return [Label(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


_CAPTION = re.compile(
    r"^\s*an?\s+(?P<color>\w+)\s+(?P<shape>\w+)(?:\s+(?:at|in)\s+the\s+(?P<pos>[a-z ]+?))?\s*$"
)


def parse_caption(prompt: str) -> Label:
    """The label a caption asks for ("a red circle at the top left", "a blue square"); InputError if the
    prompt is not one of the data set's captions."""
    m = _CAPTION.match(prompt.lower())
    if not m or m["color"] not in COLORS or m["shape"] not in SHAPES:
        raise InputError(
            f"prompt {prompt!r} is not a shapes caption ('a <color> <shape> [at the <position>]')"
        )
    pos = m["pos"]
    if pos is not None and pos not in POSITIONS:
        raise InputError(
            f"prompt {prompt!r}: unknown position {pos!r}; expected one of {', '.join(POSITIONS)}"
        )
    return Label(m["color"], m["shape"], pos)


def draw(label: Label, rng: np.random.Generator | None = None, size: int = SIZE) -> np.ndarray:
    """The picture of ``label`` as float32 (size, size, 3) in 0..1. ``rng`` jitters the shape's size, place
    and color slightly (a data set's variety); None draws the canonical picture. A label without a position
    gets one from ``rng`` (the center without one)."""
    position = label.position
    if position is None:
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))] if rng is not None else "center"
    fx, fy = POSITIONS[position]
    radius = RADIUS * size
    color = np.array(COLORS[label.color])
    if rng is not None:
        radius *= rng.uniform(0.85, 1.12)
        fx += rng.uniform(-0.04, 0.04)
        fy += rng.uniform(-0.04, 0.04)
        color = np.clip(color + rng.uniform(-0.06, 0.06, 3), 0, 1)
    # draw at 4x and downsample: antialiased edges, like a photo of a shape rather than a pixel mask
    scale = 4
    big = size * scale
    cx, cy, r = fx * big, fy * big, radius * scale
    img = Image.new("RGB", (big, big), tuple(int(round(v * 255)) for v in BACKGROUND))
    pen = ImageDraw.Draw(img)
    fill = tuple(int(round(v * 255)) for v in color)
    if label.shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif label.shape == "square":
        s = r * 0.9  # same area as the circle, roughly: the classes differ by shape, not by size
        pen.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:  # an upright triangle, centered on its bounding box
        h = r * 1.1
        pen.polygon([(cx, cy - h), (cx + h * 1.1, cy + h), (cx - h * 1.1, cy + h)], fill=fill)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def dataset(
    n: int, seed: int = 0, size: int = SIZE, p_no_position: float = 0.2
) -> tuple[np.ndarray, list[str], list[Label]]:
    """``n`` jittered pictures (float32 (n, size, size, 3) in 0..1), their captions and labels. Labels cycle
    through :func:`all_labels` so every combination is equally common; a share ``p_no_position`` of the
    captions leaves the position out (the picture still has one), so "a blue square" works."""
    rng = np.random.default_rng(seed)
    labels = all_labels()
    images, captions, drawn = [], [], []
    for i in range(n):
        label = labels[i % len(labels)]
        images.append(draw(label, rng, size))
        shown = Label(label.color, label.shape, None) if rng.random() < p_no_position else label
        captions.append(shown.caption())
        drawn.append(label)
    return np.stack(images), captions, drawn


# ------------------------------------------------------------------------------------------------ checker


def _distance(image: np.ndarray) -> tuple[np.ndarray, float]:
    """How far each pixel is from the background (the border's median color), and the strongest
    distance (99th percentile, so that one stray pixel does not set it)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    dist = np.abs(image - np.median(border, axis=0)).max(axis=-1)
    return dist, float(np.percentile(dist, 99))


def _foreground(image: np.ndarray) -> np.ndarray:
    """Foreground mask: pixels over half the strongest distance from the background (robust to blurred
    edges); empty when nothing stands out (a flat picture)."""
    dist, peak = _distance(image)
    if peak < 0.15:
        return np.zeros(dist.shape, dtype=bool)
    return dist > 0.5 * peak


def _largest_component(mask: np.ndarray) -> np.ndarray:
    # 4-connected flood fill; pictures are tiny, so a plain Python walk is fast enough
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def shape_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scale- and translation-invariant features of the shape ``mask`` (one component) picks out: the fill
    of its bounding box and normalised central moments eta20, eta02, eta11, eta03, eta30, eta22 and
    eta40 + eta04 (a square's corners weigh in x^2 y^2, a circle's rim does not; a triangle is skewed in y).
    The moments weigh each pixel by its distance from the background (over a 15% noise floor), in the
    mask's bounding box grown by 2 pixels: a soft mask's area and centroid do not change when a decoder
    blurs the edges, where a thresholded one rounds a square's corners off."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return np.zeros(8)
    dist, peak = _distance(image)
    weight = np.zeros_like(dist)
    y0, y1, x0, x1 = max(ys.min() - 2, 0), ys.max() + 3, max(xs.min() - 2, 0), xs.max() + 3
    # below 15% of the shape's distance is background noise, not shape
    weight[y0:y1, x0:x1] = np.clip((dist[y0:y1, x0:x1] / peak - 0.15) / 0.85, 0, 1)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    area = float(weight.sum())
    dx = xx - (weight * xx).sum() / area
    dy = yy - (weight * yy).sum() / area

    def eta(p: int, q: int) -> float:
        return float((weight * dx**p * dy**q).sum() / area ** (1 + (p + q) / 2))

    bbox = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return np.array(
        [area / bbox, eta(2, 0), eta(0, 2), eta(1, 1), eta(0, 3), eta(3, 0), eta(2, 2), eta(4, 0) + eta(0, 4)]
    )


def hue_of(image: np.ndarray, mask: np.ndarray) -> float | None:
    """The hue (degrees) of the mask's mean color, or None when the foreground is gray."""
    if not mask.any():
        return None
    r, g, b = image[mask].mean(axis=0)
    h, s, _ = colorsys.rgb_to_hsv(float(r), float(g), float(b))
    return None if s < 0.25 else h * 360.0


def _blur(image: np.ndarray, radius: float) -> np.ndarray:
    pil = Image.fromarray(np.round(image * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(pil, dtype=np.float32) / 255.0


_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in COLORS.items()}


class ShapeChecker:
    """Reads color, shape and position off a picture (float (H, W, 3) in 0..1 or uint8).

    Fitted once on the generator's own jittered pictures (``fit_images`` of them, seed ``seed``), half of
    them blurred (a decoder's pictures are softer than a rasteriser's); never on a model's outputs. Shape:
    the nearest class mean of :func:`shape_features` under the pooled within-class covariance (linear
    discriminant analysis)."""

    def __init__(self, fit_images: int = 480, seed: int = 12345, size: int = SIZE) -> None:
        images, _, labels = dataset(fit_images, seed=seed, size=size, p_no_position=0.0)
        rng = np.random.default_rng(seed)
        images = [_blur(im, rng.uniform(0.3, 1.6)) if i % 2 else im for i, im in enumerate(images)]
        feats = np.stack([shape_features(im, _largest_component(_foreground(im))) for im in images])
        self.mean, self.std = feats.mean(0), feats.std(0) + 1e-9
        z = (feats - self.mean) / self.std
        names = np.array([lab.shape for lab in labels])
        self.centroids = {s: z[names == s].mean(0) for s in SHAPES}
        pooled = sum(np.cov(z[names == s].T) for s in SHAPES) / len(SHAPES)
        self.precision = np.linalg.inv(pooled + 1e-6 * np.eye(len(pooled)))

    def read(self, image: np.ndarray) -> Label | None:
        """The label the picture shows, or None when no colored shape stands out."""
        image = np.asarray(image, dtype=np.float32)
        if image.max() > 1.5:
            image = image / 255.0
        mask = _largest_component(_foreground(image))
        hue = hue_of(image, mask)
        if hue is None or mask.sum() < 4:
            return None
        color = min(_HUES, key=lambda c: min(abs(hue - _HUES[c]), 360 - abs(hue - _HUES[c])))
        z = (shape_features(image, mask) - self.mean) / self.std
        gaps = {s: z - c for s, c in self.centroids.items()}
        shape = min(gaps, key=lambda s: float(gaps[s] @ self.precision @ gaps[s]))
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h  # pixel i covers [i, i + 1) / w
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        return Label(color, shape, position)

    def matches(self, image: np.ndarray, prompt: str | Label) -> bool:
        """True when the picture shows what ``prompt`` asks for (its position only when it names one)."""
        want = parse_caption(prompt) if isinstance(prompt, str) else prompt
        got = self.read(image)
        if got is None:
            return False
        return (
            got.color == want.color
            and got.shape == want.shape
            and (want.position is None or got.position == want.position)
        )

    def recognition_rate(self, images: Sequence[np.ndarray], prompts: Sequence[str | Label]) -> float:
        """Share of pictures that show their prompt."""
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} images for {len(prompts)} prompts")
        return sum(self.matches(im, p) for im, p in zip(images, prompts, strict=True)) / max(len(images), 1)


def labelled_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    verdicts: Sequence[bool],
    cols: int = 8,
    cell: int = 96,
) -> Image.Image:
    """A PNG-ready grid: each picture (HWC, uint8 or 0..1 floats) enlarged to ``cell`` pixels, its caption
    under it, and a green (read as its prompt) or red (not) corner mark."""
    rows = -(-len(images) // cols)
    text_h = 24
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    pen = ImageDraw.Draw(grid)
    for k, (image, caption, ok) in enumerate(zip(images, captions, verdicts, strict=True)):
        r, c = divmod(k, cols)
        x, y = c * cell, r * (cell + text_h)
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        grid.paste(Image.fromarray(array).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        words = caption.removeprefix("a ").replace(" at the ", " ").replace(" in the ", " ")
        pen.text((x + 2, y + cell), words[:17], fill=(0, 0, 0))
        pen.text((x + 2, y + cell + 11), words[17:34], fill=(0, 0, 0))
        pen.rectangle([x, y, x + 7, y + 7], fill=(0, 170, 0) if ok else (220, 0, 0))
    return grid


# Every color x shape once, at rotating places, and two prompts without a place: what the tests, the demo
# and the model's README measure recognition on.
EVAL_PROMPTS = tuple(
    [all_labels()[5 * i + i % 5].caption() for i in range(len(COLORS) * len(SHAPES))]
    + ["a blue square", "a yellow triangle"]
)


def recognition_rates(
    generate: Callable[[str, int], np.ndarray],
    prompts: Sequence[str] = EVAL_PROMPTS,
    seeds: Sequence[int] = (0, 1),
    checker: ShapeChecker | None = None,
) -> dict[str, float]:
    """Share of the pictures ``generate(prompt, seed)`` makes for every prompt x seed that show the whole
    prompt ("all"), and its color, shape and place (a prompt without a place counts as right there)."""
    checker = checker or ShapeChecker()
    hits = dict.fromkeys(("all", "color", "shape", "position"), 0)
    for seed in seeds:
        for prompt in prompts:
            image = generate(prompt, seed)
            want, got = parse_caption(prompt), checker.read(image)
            if got is None:
                continue
            hits["color"] += got.color == want.color
            hits["shape"] += got.shape == want.shape
            hits["position"] += want.position is None or got.position == want.position
            hits["all"] += (
                got.color == want.color
                and got.shape == want.shape
                and (want.position is None or got.position == want.position)
            )
    return {k: v / (len(seeds) * len(prompts)) for k, v in hits.items()}
