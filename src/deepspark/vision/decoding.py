"""Image bytes to RGB arrays, and arrays to a model's input size: what runs inside a task.

Worker side: no pyspark here. Three decoders sit on a registry (:data:`DECODERS`):
simplejpeg (libjpeg-turbo, JPEG only), OpenCV and Pillow. Each decodes straight to a reduced
size when the image is much larger than needed (JPEG's DCT scaling: 1/2, 1/4 or 1/8 of the
pixels cost a fraction of a full decode), which is where an image pipeline spends its time.

:class:`DecoderChooser` picks the decoder by measurement, per image format, in each worker:
the first few images of a format are decoded by every available decoder and the fastest one
decodes the rest. Bytes that are not an image raise :class:`ImageError` with the reason;
callers turn it into an error row.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from deepspark.errors import DeepsparkError

__all__ = [
    "DECODERS",
    "DecoderChooser",
    "Fitted",
    "ImageError",
    "ResizeMode",
    "available_decoders",
    "decode_image",
    "encode_jpeg",
    "fit_image",
    "image_format",
    "original_size",
]

LETTERBOX_FILL = 114
"""Grey of the letterbox border (the value YOLO models were trained with)."""


class ImageError(DeepsparkError, ValueError):
    """Bytes that cannot be decoded as an image; the message is the reason for the error row."""


class ResizeMode(str, Enum):
    """How an image meets a square model input."""

    CENTER_CROP = "center_crop"  # shortest side to size, keep the middle
    LETTERBOX = "letterbox"  # longest side to size, pad the rest with grey
    STRETCH = "stretch"  # both sides to size, aspect ratio lost


def image_format(data: bytes) -> str:
    """The format named by the first bytes: ``jpeg``, ``png``, ``gif``, ``webp``, ``bmp``,
    ``tiff`` or ``unknown``.

    Examples
    --------
    >>> image_format(b"\\xff\\xd8\\xff\\xe0rest")
    'jpeg'
    >>> image_format(b"hello")
    'unknown'
    """
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "unknown"


def _reduction(height: int, width: int, min_side: int | None) -> int:
    """The largest of 1, 2, 4, 8 that keeps both sides at least ``min_side``."""
    if not min_side:
        return 1
    factor = 1
    while factor < 8 and min(height, width) // (factor * 2) >= min_side:
        factor *= 2
    return factor


def original_size(data: bytes, decoded: np.ndarray) -> tuple[int, int]:
    """The (height, width) of the encoded image, which a reduced decode does not show: the
    JPEG header's, else the decoded array's (only JPEG is decoded reduced)."""
    if image_format(data) == "jpeg":
        size = _jpeg_size(data)
        if size is not None:
            return size
    return decoded.shape[0], decoded.shape[1]


def _decode_simplejpeg(data: bytes, min_side: int | None) -> np.ndarray:
    import simplejpeg

    if not simplejpeg.is_jpeg(data):
        raise ImageError("simplejpeg decodes JPEG only")
    side = min_side or 0
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)


_CV2_REDUCED = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4"}


def _decode_opencv(data: bytes, min_side: int | None) -> np.ndarray:
    import cv2

    buffer = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_COLOR
    if min_side and image_format(data) == "jpeg":
        # The header gives the size cheaply; decode reduced when the image allows it.
        probe = _jpeg_size(data)
        if probe is not None:
            reduced = min(_reduction(*probe, min_side), 8)
            name = {8: "IMREAD_REDUCED_COLOR_8"}.get(reduced, _CV2_REDUCED.get(reduced))
            flag = getattr(cv2, name)
    image = cv2.imdecode(buffer, flag)
    if image is None:
        raise ImageError("OpenCV could not decode the bytes")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame marker, or None when not found."""
    view = memoryview(data)
    index = 2
    while index + 9 < len(view):
        if view[index] != 0xFF:
            return None
        marker = view[index + 1]
        length = int.from_bytes(view[index + 2 : index + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height = int.from_bytes(view[index + 5 : index + 7], "big")
            width = int.from_bytes(view[index + 7 : index + 9], "big")
            return height, width
        index += 2 + length
    return None


def _decode_pillow(data: bytes, min_side: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if min_side and image.format == "JPEG":
                # draft() lets libjpeg scale by 1/2, 1/4 or 1/8 while it decodes.
                height, width = image.height, image.width
                factor = _reduction(height, width, min_side)
                image.draft("RGB", (width // factor, height // factor))
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"Pillow could not decode the bytes: {err}") from err


DECODERS: dict[str, Callable[[bytes, int | None], np.ndarray]] = {
    "simplejpeg": _decode_simplejpeg,
    "opencv": _decode_opencv,
    "pillow": _decode_pillow,
}
"""Decoder name to ``decode(data, min_side) -> (H, W, 3) uint8 RGB``."""

_MODULES = {"simplejpeg": "simplejpeg", "opencv": "cv2", "pillow": "PIL"}
# Formats each decoder reads: simplejpeg reads JPEG only.
_FORMATS = {"simplejpeg": {"jpeg"}}


def available_decoders() -> list[str]:
    """The registry's decoders whose library is installed, in registry order."""
    import importlib.util

    return [name for name in DECODERS if importlib.util.find_spec(_MODULES[name]) is not None]


def decode_image(data: bytes | None, decoder: str = "opencv", min_side: int | None = None):
    """Decode ``data`` into an ``(H, W, 3)`` uint8 RGB array with ``decoder``.

    Parameters
    ----------
    data : bytes
        The encoded image.
    decoder : str
        A name in :data:`DECODERS`.
    min_side : int, optional
        Decode reduced (by 2, 4 or 8) as long as both sides stay at least this long.

    Raises
    ------
    ImageError
        When the bytes are empty, not an image, or cannot be decoded.

    Examples
    --------
    >>> import numpy as np
    >>> data = encode_jpeg(np.zeros((64, 48, 3), np.uint8))
    >>> decode_image(data, "pillow").shape
    (64, 48, 3)
    """
    if data is None or len(data) == 0:
        raise ImageError("empty file (no bytes)")
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: choose one of {sorted(DECODERS)} or 'auto'")
    try:
        image = DECODERS[decoder](bytes(data), min_side)
    except ImageError:
        raise
    except Exception as err:  # each library has its own errors for broken files
        raise ImageError(
            f"{decoder} could not decode the bytes: {type(err).__name__}: {err}"
        ) from err
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
        raise ImageError(f"decoded to an unexpected shape {image.shape}")
    return np.ascontiguousarray(image)


@dataclass
class DecoderChooser:
    """Picks, per image format, the decoder that measures fastest in this worker.

    The first ``trials`` images of a format are decoded by every candidate that reads the
    format; afterwards the fastest (by total time over those trials) decodes that format.
    ``decoder`` other than ``"auto"`` skips the measurement.

    Examples
    --------
    >>> import numpy as np
    >>> chooser = DecoderChooser(trials=1)
    >>> image = chooser.decode(encode_jpeg(np.full((32, 32, 3), 9, np.uint8)))
    >>> image.shape, chooser.chosen["jpeg"] in DECODERS
    ((32, 32, 3), True)
    """

    decoder: str = "auto"
    trials: int = 3
    min_side: int | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen: dict[str, str] = field(default_factory=dict)

    def decode(self, data: bytes | None) -> np.ndarray:
        if data is None or len(data) == 0:
            raise ImageError("empty file (no bytes)")
        kind = image_format(data)
        if self.decoder != "auto":
            return decode_image(data, self.decoder, self.min_side)
        candidates = [
            name for name in available_decoders() if kind in _FORMATS.get(name, {kind})
        ] or ["opencv"]
        chosen = self.chosen.get(kind)
        if chosen is None:
            return self._measure(kind, data, candidates)
        try:
            return decode_image(data, chosen, self.min_side)
        except ImageError as first:
            # Another library may read what the fastest one refuses (e.g. a CMYK JPEG).
            reasons = [f"{chosen}: {first}"]
            for name in candidates:
                if name != chosen:
                    try:
                        return decode_image(data, name, self.min_side)
                    except ImageError as err:
                        reasons.append(f"{name}: {err}")
            raise ImageError(_unreadable(kind, reasons)) from first

    def _measure(self, kind: str, data: bytes, candidates: list[str]) -> np.ndarray:
        totals = self.timings.setdefault(kind, {})
        result, reasons = None, []
        for name in candidates:
            start = time.perf_counter()
            try:
                image = decode_image(data, name, self.min_side)
            except ImageError as err:
                reasons.append(f"{name}: {err}")
                continue
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            result = image if result is None else result
        if result is None:
            raise ImageError(_unreadable(kind, reasons))
        totals["_trials"] = totals.get("_trials", 0.0) + 1
        if totals["_trials"] >= self.trials:
            measured = {name: spent for name, spent in totals.items() if name != "_trials"}
            self.chosen[kind] = min(measured, key=measured.__getitem__)
        return result


def _unreadable(kind: str, reasons: list[str]) -> str:
    what = "not an image" if kind == "unknown" else f"a broken {kind} file"
    return f"{what}: " + "; ".join(reasons)


@dataclass(frozen=True)
class Fitted:
    """An image fitted to a square input, with how to map its pixels back to the original."""

    pixels: np.ndarray  # (size, size, 3) uint8
    scale: float  # input pixels per original pixel
    offset_x: float  # where the original's left edge lands in the input
    offset_y: float


def fit_image(image: np.ndarray, size: int, mode: ResizeMode | str) -> Fitted:
    """Resize ``image`` to ``size`` x ``size`` with ``mode`` (area filter when shrinking).

    Examples
    --------
    >>> import numpy as np
    >>> fitted = fit_image(np.zeros((100, 200, 3), np.uint8), 50, "letterbox")
    >>> fitted.pixels.shape, fitted.scale, fitted.offset_y
    ((50, 50, 3), 0.25, 12.5)
    """
    import cv2

    mode = ResizeMode(mode)
    height, width = image.shape[:2]
    if mode is ResizeMode.STRETCH:
        pixels = _resized(cv2, image, size, size)
        return Fitted(pixels, size / max(height, width), 0.0, 0.0)
    if mode is ResizeMode.CENTER_CROP:
        scale = size / min(height, width)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        resized = _resized(cv2, image, new_w, new_h)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        pixels = np.ascontiguousarray(resized[top : top + size, left : left + size])
        return Fitted(pixels, scale, -float(left), -float(top))
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = _resized(cv2, image, new_w, new_h)
    pixels = np.full((size, size, 3), LETTERBOX_FILL, dtype=np.uint8)
    top, left = (size - new_h) / 2, (size - new_w) / 2
    pixels[int(top) : int(top) + new_h, int(left) : int(left) + new_w] = resized
    return Fitted(pixels, scale, left, top)


def _resized(cv2, image: np.ndarray, width: int, height: int) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == (width, height):
        return image
    shrinking = width < image.shape[1] or height < image.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """``(H, W, 3)`` uint8 RGB to JPEG bytes (simplejpeg when installed, else OpenCV)."""
    image = np.ascontiguousarray(image)
    try:
        import simplejpeg
    except ImportError:
        import cv2

        ok, buffer = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if not ok:
            raise ImageError("OpenCV could not encode the crop") from None
        return buffer.tobytes()
    return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB")
