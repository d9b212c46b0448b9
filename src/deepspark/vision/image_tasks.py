"""The work inside an image task: Arrow batches of image bytes in, rows of results out.

Worker side: no pyspark here (the Spark wiring is :mod:`deepspark.vision.images`), so the
functions run, and are tested, on plain pyarrow batches. Images are decoded, fitted and sent
through the model in batches of ``batch_size``; an image that cannot be read or decoded
becomes one row whose ``error`` column says why, and the task goes on.

Models are loaded once per Python worker: embedders through the inference engine's model
cache (:func:`deepspark.inference.load_model`), Darknet detectors through this module's own
small cache (OpenCV networks are not torch predictors).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from deepspark.inference import ModelSource, load_model
from deepspark.vision.decoding import (
    DecoderChooser,
    ImageError,
    ResizeMode,
    encode_jpeg,
    fit_image,
    original_size,
)
from deepspark.vision.zoo import Box, DarknetDetector, YoloFiles

__all__ = [
    "DetectSpec",
    "EmbedSpec",
    "ImageColumns",
    "detect_partition",
    "embed_partition",
    "load_detector",
]

ERROR_COL = "error"


@dataclass(frozen=True)
class ImageColumns:
    """Where a row's image is: bytes in ``content_col``, or a file at the URL in ``path_col``
    (read with fsspec when the bytes are absent). ``keep_cols`` pass through unchanged."""

    content_col: str | None
    path_col: str | None
    keep_cols: tuple[str, ...]


@dataclass(frozen=True)
class EmbedSpec:
    """What an embed task needs: the model, the input size and how to get there."""

    model: ModelSource
    columns: ImageColumns
    size: int = 224
    resize: ResizeMode = ResizeMode.CENTER_CROP
    batch_size: int = 32
    decoder: str = "auto"
    num_threads: int | None = None
    output_col: str = "features"


@dataclass(frozen=True)
class DetectSpec:
    """What a detect task needs. ``files`` names a Darknet network run by OpenCV DNN;
    ``factory`` (a zero-argument callable returning ``image -> list[Box]``, as cloudpickle
    bytes, so it travels like an in-memory model) plugs in any other detector. ``embed``
    adds the features of each crop."""

    columns: ImageColumns
    files: YoloFiles | None = None
    factory: bytes | None = field(default=None, repr=False)
    factory_key: str = ""
    class_names: tuple[str, ...] = ()
    input_size: int = 416
    scales: tuple[float, ...] = (1.0, 0.6)
    score_threshold: float = 0.3
    iou_threshold: float = 0.45
    classes: tuple[str, ...] = ()
    with_crops: bool = True
    decoder: str = "auto"
    num_threads: int | None = None
    embed: EmbedSpec | None = None
    runtime: str = "opencv"
    batch_size: int = 16


_detectors: dict[str, Callable[[np.ndarray], list[Box]]] = {}
_detectors_lock = threading.Lock()


def load_detector(spec: DetectSpec) -> Callable[[np.ndarray], list[Box]]:
    """The spec's detector, built once per Python worker and reused by later tasks."""
    if spec.files is not None:
        key = (
            "darknet:"
            + hashlib.sha256(
                repr(
                    (
                        spec.files,
                        spec.input_size,
                        spec.scales,
                        spec.score_threshold,
                        spec.iou_threshold,
                        spec.runtime,
                    )
                ).encode()
            ).hexdigest()
        )
    else:
        key = "factory:" + spec.factory_key
    with _detectors_lock:
        if key not in _detectors:
            if spec.files is not None:
                _detectors[key] = DarknetDetector(
                    spec.files,
                    input_size=spec.input_size,
                    scales=spec.scales,
                    score_threshold=spec.score_threshold,
                    iou_threshold=spec.iou_threshold,
                    num_threads=spec.num_threads,
                    runtime=spec.runtime,
                )
            else:
                import cloudpickle

                # Unpickles code: the factory is the caller's own, given to `detect`.
                _detectors[key] = cloudpickle.loads(spec.factory)()
        return _detectors[key]


def _set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
        try:
            import cv2

            cv2.setNumThreads(num_threads)
        except ImportError:
            pass


def _image_bytes(batch: pa.RecordBatch, columns: ImageColumns) -> list[bytes | Exception | None]:
    """Each row's encoded image, or the error that kept it from being read."""
    contents = batch.column(columns.content_col).to_pylist() if columns.content_col else None
    paths = batch.column(columns.path_col).to_pylist() if columns.path_col else None
    found: list[bytes | Exception | None] = []
    for row in range(batch.num_rows):
        data = contents[row] if contents is not None else None
        if data is None and paths is not None and paths[row] is not None:
            try:
                import fsspec

                with fsspec.open(paths[row], "rb") as handle:
                    data = handle.read()
            except Exception as err:  # a missing or unreadable file is an error row
                data = ImageError(f"cannot read {paths[row]}: {type(err).__name__}: {err}")
        found.append(data)
    return found


def _decoded(chooser: DecoderChooser, data: bytes | Exception | None) -> np.ndarray | ImageError:
    if isinstance(data, Exception):
        return data if isinstance(data, ImageError) else ImageError(str(data))
    try:
        return chooser.decode(data)
    except ImageError as err:
        return err


def _list_column(rows: list[np.ndarray | None]) -> pa.Array:
    """A ``list<float>`` column; ``None`` rows are nulls."""
    mask = np.array([row is None for row in rows], dtype=bool)
    lengths = np.array([0 if row is None else len(row) for row in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    present = [row for row in rows if row is not None]
    values = np.concatenate(present).astype(np.float32) if present else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=pa.array(mask))


def _run_embedder(predictor, pixels: list[np.ndarray]) -> np.ndarray:
    output = predictor((torch.from_numpy(np.stack(pixels)),))
    features = np.asarray(output, dtype=np.float32).reshape(len(pixels), -1)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def embed_images(
    spec: EmbedSpec, images: list[np.ndarray | ImageError]
) -> list[np.ndarray | ImageError]:
    """Features of each decoded image (errors stay errors), in batches of ``batch_size``."""
    predictor = load_model(spec.model, num_threads=spec.num_threads)
    results: list[np.ndarray | ImageError] = list(images)
    ready = [index for index, image in enumerate(images) if not isinstance(image, ImageError)]
    for start in range(0, len(ready), spec.batch_size):
        chunk = ready[start : start + spec.batch_size]
        pixels = [fit_image(images[i], spec.size, spec.resize).pixels for i in chunk]
        for index, features in zip(chunk, _run_embedder(predictor, pixels), strict=True):
            results[index] = features
    return results


def embed_partition(batches: Iterable[pa.RecordBatch], spec: EmbedSpec) -> Iterator[pa.RecordBatch]:
    """One output row per input row: the kept columns, ``features``, ``width``, ``height``
    and ``error`` (null when the image was embedded)."""
    _set_threads(spec.num_threads)
    chooser = DecoderChooser(spec.decoder, min_side=spec.size)
    for batch in batches:
        for start in range(0, batch.num_rows, spec.batch_size):
            part = batch.slice(start, spec.batch_size)
            encoded = _image_bytes(part, spec.columns)
            images = [_decoded(chooser, data) for data in encoded]
            sizes = [
                (None, None) if isinstance(image, ImageError) else original_size(data, image)
                for data, image in zip(encoded, images, strict=True)
            ]
            features = embed_images(spec, images)
            columns = {name: part.column(name) for name in spec.columns.keep_cols}
            columns[spec.output_col] = _list_column(
                [None if isinstance(f, ImageError) else f for f in features]
            )
            columns["width"] = pa.array([w for _, w in sizes], pa.int32())
            columns["height"] = pa.array([h for h, _ in sizes], pa.int32())
            columns[ERROR_COL] = pa.array(
                [str(f) if isinstance(f, ImageError) else None for f in features], pa.string()
            )
            yield pa.RecordBatch.from_pydict(columns)


def detect_partition(
    batches: Iterable[pa.RecordBatch], spec: DetectSpec
) -> Iterator[pa.RecordBatch]:
    """One output row per box found: the kept columns, ``box_index``, ``label``, ``class_id``,
    ``score``, ``box`` (x0, y0, x1, y1 in the image's pixels), ``crop`` (JPEG bytes, when
    ``with_crops``), ``features`` of the crop (when ``spec.embed``) and ``error``. An image
    that cannot be decoded gives one row with its ``error`` and nulls; one without boxes
    gives no row."""
    _set_threads(spec.num_threads)
    detector = load_detector(spec)
    chooser = DecoderChooser(spec.decoder, min_side=spec.input_size)
    for whole in batches:
        for start in range(0, whole.num_rows, spec.batch_size):
            yield _detect_batch(whole.slice(start, spec.batch_size), spec, detector, chooser)


def _detect_batch(
    batch: pa.RecordBatch, spec: DetectSpec, detector, chooser: DecoderChooser
) -> pa.RecordBatch:
    """The rows of one slice of images: decoded, detected as one batch, cropped, embedded."""
    names = tuple(getattr(detector, "class_names", ())) or spec.class_names
    wanted = set(spec.classes)
    encoded = _image_bytes(batch, spec.columns)
    images = [_decoded(chooser, data) for data in encoded]
    ready = [image for image in images if not isinstance(image, ImageError)]
    # Darknet detectors run a batch per view; a plugged-in one takes an image at a time.
    found = iter(detector.detect(ready) if hasattr(detector, "detect") else map(detector, ready))
    source_rows: list[int] = []
    fields: dict[str, list] = {
        key: [] for key in ("box_index", "label", "class_id", "score", "box", "crop", ERROR_COL)
    }
    crops_pixels: list[np.ndarray | ImageError] = []
    for row, (data, image) in enumerate(zip(encoded, images, strict=True)):
        if isinstance(image, ImageError):
            source_rows.append(row)
            for key in fields:
                fields[key].append(str(image) if key == ERROR_COL else None)
            crops_pixels.append(image)
            continue
        # A JPEG may be decoded reduced: boxes are given in the original's pixels.
        factor = original_size(data, image)[0] / image.shape[0]
        boxes = [b for b in next(found) if not wanted or _label(names, b.class_id) in wanted]
        for index, box in enumerate(boxes):
            crop = image[int(box.y0) : int(np.ceil(box.y1)), int(box.x0) : int(np.ceil(box.x1))]
            source_rows.append(row)
            fields["box_index"].append(index)
            fields["label"].append(_label(names, box.class_id))
            fields["class_id"].append(box.class_id)
            fields["score"].append(box.score)
            corners = (box.x0, box.y0, box.x1, box.y1)
            fields["box"].append([value * factor for value in corners])
            fields["crop"].append(encode_jpeg(crop) if spec.with_crops else None)
            fields[ERROR_COL].append(None)
            crops_pixels.append(np.ascontiguousarray(crop))
    columns = {
        name: batch.column(name).take(pa.array(source_rows, pa.int64()))
        for name in spec.columns.keep_cols
    }
    columns["box_index"] = pa.array(fields["box_index"], pa.int32())
    columns["label"] = pa.array(fields["label"], pa.string())
    columns["class_id"] = pa.array(fields["class_id"], pa.int32())
    columns["score"] = pa.array(fields["score"], pa.float32())
    columns["box"] = pa.array(fields["box"], pa.list_(pa.float32()))
    if spec.with_crops:
        columns["crop"] = pa.array(fields["crop"], pa.binary())
    if spec.embed is not None:
        features = embed_images(spec.embed, crops_pixels)
        columns[spec.embed.output_col] = _list_column(
            [None if isinstance(f, ImageError) else f for f in features]
        )
    columns[ERROR_COL] = pa.array(fields[ERROR_COL], pa.string())
    return pa.RecordBatch.from_pydict(columns)


def _label(names: tuple[str, ...], class_id: int) -> str:
    return names[class_id] if 0 <= class_id < len(names) else str(class_id)
