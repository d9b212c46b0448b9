"""A near-duplicate image set built from real photos that ship inside installed packages.

No pyspark here and nothing downloads: the photos come from scikit-image (``skimage.data``)
and scikit-learn (``load_sample_images``). Each variant of a photo is made by cropping,
rescaling, flipping, shifting its colours and re-encoding it as JPEG, so which files are
duplicates of which is known by construction. Used by the tests, the docs and
``benchmarks/images.py``. :func:`calibration_photos` are other photos, kept apart for
calibrating int8 models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from deepspark.vision.decoding import encode_jpeg

__all__ = [
    "PHOTO_NAMES",
    "SampleImage",
    "calibration_photos",
    "photos",
    "variant",
    "write_near_duplicates",
]

PHOTO_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
"""scikit-image photos used (``cat`` is ``chelsea`` again, so it is left out)."""


def photos() -> dict[str, np.ndarray]:
    """Every distinct photo, as ``(H, W, 3)`` uint8 RGB: scikit-image's and scikit-learn's.

    Raises
    ------
    ImportError
        When scikit-image or scikit-learn is missing.
    """
    try:
        from skimage import data
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise ImportError(
            "the sample photos need scikit-image and scikit-learn: "
            "run `pip install scikit-image scikit-learn`"
        ) from err
    found = {name: _rgb(getattr(data, name)()) for name in PHOTO_NAMES}
    for name, image in zip(("china", "flower"), load_sample_images().images, strict=True):
        found[name] = np.ascontiguousarray(image)
    return found


def _rgb(image: np.ndarray) -> np.ndarray:
    """A grey, float, boolean or RGBA picture as ``(H, W, 3)`` uint8 RGB."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        scale = 255 if image.max() <= 1 else 1
        image = (image.astype(np.float32) * scale).clip(0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


CALIBRATION_NAMES = ("cell", "logo", "colorwheel")
"""scikit-image pictures for calibration, besides the stereo motorcycle pair."""


def calibration_photos(seed: int = 0) -> list[np.ndarray]:
    """Pictures for calibrating an int8 model, none of them one of :func:`photos`: the
    quantized models are then tested on photos their calibration never saw.

    scikit-image's stereo motorcycle pair, cell, logo and colour wheel, as ``(H, W, 3)``
    uint8 RGB, each followed by one :func:`variant` of it (10 in all). (Its microaneurysms
    picture, a dim 102-pixel retina, is left out: no photo looks like it, and its int8
    features were the furthest from the float ones, at a cosine of 0.90.)

    Raises
    ------
    ImportError
        When scikit-image is missing.
    """
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError(
            "int8 calibration needs scikit-image's pictures: run `pip install scikit-image`"
        ) from err
    left, right, _ = data.stereo_motorcycle()
    pictures = [_rgb(left), _rgb(right)]
    pictures += [_rgb(getattr(data, name)()) for name in CALIBRATION_NAMES]
    rng = np.random.default_rng(seed)
    return [made for picture in pictures for made in (picture, variant(picture, rng))]


def variant(
    image: np.ndarray, rng: np.random.Generator, *, long_side: int | None = None
) -> np.ndarray:
    """A near-duplicate of ``image``: a random crop (up to 12% off each side), a rescale
    (to ``long_side`` pixels, or 60 to 120% with a long side of at least 360 pixels), a
    horizontal flip half of the time, and a colour shift (channel gains within 8%, an
    offset within 10 levels)."""
    import cv2

    height, width = image.shape[:2]
    top, bottom = rng.uniform(0, 0.12, size=2) * height
    left, right = rng.uniform(0, 0.12, size=2) * width
    out = image[int(top) : height - int(bottom), int(left) : width - int(right)]
    longest = max(out.shape[:2])
    # Rescaled, yet never below a third of a megapixel's side: thumbnails of a few dozen
    # pixels are not what a duplicate search meets, and say little about the photo.
    scale = long_side / longest if long_side else max(rng.uniform(0.6, 1.2), 360 / longest)
    size = (max(16, round(out.shape[1] * scale)), max(16, round(out.shape[0] * scale)))
    out = cv2.resize(out, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    gains = rng.uniform(0.92, 1.08, size=3)
    offset = rng.uniform(-10, 10)
    return np.clip(out.astype(np.float32) * gains + offset, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SampleImage:
    """One written file and the photo it was made from (its duplicate group)."""

    path: str
    photo: str


def write_near_duplicates(
    folder: str,
    variants_per_photo: int = 3,
    *,
    seed: int = 0,
    long_side: int | None = None,
    count: int | None = None,
    quality: tuple[int, int] = (60, 92),
) -> list[SampleImage]:
    """Write JPEG files of every photo and its variants into ``folder``.

    Parameters
    ----------
    folder : str
        Created if needed.
    variants_per_photo : int
        Variants written per photo, besides the photo itself.
    seed : int
        Makes the set reproducible.
    long_side : int, optional
        Scale every file to this longest side (for realistic sizes); by default variants
        are 50 to 100% of the cropped photo.
    count : int, optional
        Write exactly this many files, cycling over the photos (for scale runs).
    quality : (int, int)
        The range of JPEG qualities drawn for each file.

    Returns
    -------
    list of SampleImage
        The files and their photos: two files are duplicates when their photos are equal.

    Examples
    --------
    >>> import tempfile
    >>> written = write_near_duplicates(tempfile.mkdtemp(), 1)
    >>> len(written), len({image.photo for image in written})
    (36, 18)
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = photos()
    names = sorted(sources)
    total = count if count is not None else len(names) * (variants_per_photo + 1)
    written = []
    for index in range(total):
        name = names[index % len(names)]
        first = count is None and index < len(names)
        image = sources[name] if first else variant(sources[name], rng, long_side=long_side)
        path = os.path.join(folder, f"{name}_{index:06d}.jpg")
        with open(path, "wb") as handle:
            handle.write(encode_jpeg(image, int(rng.integers(quality[0], quality[1] + 1))))
        written.append(SampleImage(path, name))
    return written
