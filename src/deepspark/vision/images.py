"""Read, embed and detect: image DataFrames in, DataFrames of results out (driver side).

Every function checks its arguments and builds a small picklable spec on the driver, then
hands the work to a non-barrier ``mapInArrow`` whose function runs
:mod:`deepspark.vision.image_tasks` inside the tasks: decoding, resizing and the models all
run where the bytes are, in batches, with the model loaded once per Python worker.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from deepspark.deprecation import renamed_keywords
from deepspark.inference.runtimes import import_onnxruntime
from deepspark.vision.darknet import RUNTIMES as DARKNET_RUNTIMES
from deepspark.vision.darknet import fastest_runtime
from deepspark.vision.decoding import DECODERS, ResizeMode
from deepspark.vision.embedder import embedder_source
from deepspark.vision.image_tasks import (
    DetectSpec,
    EmbedSpec,
    ImageColumns,
    detect_partition,
    embed_partition,
)
from deepspark.vision.zoo import network_side, yolov3_tiny_files

__all__ = ["detect", "embed", "read_images"]


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def read_images(
    source: Any,
    *,
    spark: Any = None,
    format: str = "binaryFile",
    content_col: str | None = None,
    path_col: str | None = None,
    id_col: str | None = None,
    recursive: bool = True,
    num_partitions: int | None = None,
) -> Any:
    """A DataFrame of images: ``image_id``, ``path`` and ``content`` (the encoded bytes).

    Parameters
    ----------
    source : str or DataFrame
        A folder or glob of image files (``format="binaryFile"``); a Parquet or Delta table
        with a column of bytes (``format="parquet"`` or ``"delta"`` and ``content_col``); or
        a DataFrame with a column of bytes (``content_col``) or of file URLs (``path_col``,
        read inside the tasks, so ``content`` stays null).
    spark : SparkSession, optional
        The session (default the active one).
    format : str
        How to read a ``source`` given as a string.
    content_col, path_col, id_col : str, optional
        The columns of bytes, of file URLs and of ids (default: the path, else the row's
        position).
    recursive : bool
        Look into sub-folders of a folder.
    num_partitions : int, optional
        Repartition to this many partitions (spreads few large files over all cores).

    Examples
    --------
    >>> images = read_images("/data/photos/*.jpg")  # doctest: +SKIP
    """
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql import functions as F

    if isinstance(source, DataFrame):
        frame = source
    elif isinstance(source, (str, os.PathLike)):
        spark = spark or SparkSession.active()
        location = os.fspath(source)
        if format == "binaryFile":
            frame = (
                spark.read.format("binaryFile")
                .option("recursiveFileLookup", str(recursive).lower())
                .load(location)
            )
            content_col, path_col = content_col or "content", path_col or "path"
        elif format in ("parquet", "delta"):
            if not content_col and not path_col:
                raise ValueError(
                    f"format={format!r} needs content_col= (a column of image bytes) or path_col="
                )
            frame = spark.read.format(format).load(location)
        else:
            raise ValueError(f"format={format!r}: use 'binaryFile', 'parquet' or 'delta'")
    else:
        raise TypeError(f"source: give a path, a glob or a DataFrame, not {type(source).__name__}")
    if not content_col and not path_col:
        if "content" in frame.columns:
            content_col = "content"
        if "path" in frame.columns:
            path_col = "path"
        if not content_col and not path_col:
            raise ValueError(
                f"source has columns {frame.columns}: name the image bytes with content_col= "
                "or the file URLs with path_col="
            )
    for argument, name in (
        ("content_col", content_col),
        ("path_col", path_col),
        ("id_col", id_col),
    ):
        if name and name not in frame.columns:
            raise ValueError(
                f"{argument}={name!r} is not a column of source (columns: {frame.columns})"
            )
    content = F.col(content_col).cast("binary") if content_col else F.lit(None).cast("binary")
    path = F.col(path_col).cast("string") if path_col else F.lit(None).cast("string")
    if id_col:
        image_id = F.col(id_col).cast("string")
    elif path_col:
        image_id = path
    else:
        image_id = F.monotonically_increasing_id().cast("string")
    images = frame.select(image_id.alias("image_id"), path.alias("path"), content.alias("content"))
    return images.repartition(num_partitions) if num_partitions else images


def _image_columns(images: Any, extra_drop: tuple[str, ...] = ()) -> ImageColumns:
    columns = images.columns
    content_col = "content" if "content" in columns else None
    path_col = "path" if "path" in columns else None
    if content_col is None and path_col is None:
        raise ValueError(
            f"images has columns {columns}: give a DataFrame from vision.read_images (or one "
            "with a binary 'content' column or a 'path' column)"
        )
    keep = tuple(name for name in columns if name != content_col and name not in extra_drop)
    return ImageColumns(content_col, path_col, keep)


def _task_threads(spark: Any, num_threads: int | None) -> int:
    if num_threads is not None:
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads={num_threads!r}: give a positive integer or None")
        return num_threads
    from deepspark.context.topology import task_cpus

    return task_cpus(spark)


def _check_common(size: int, batch_size: int, decoder: str, resize: str) -> ResizeMode:
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size={size!r}: give the model's input side in pixels (an int >= 8)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give a positive integer")
    if decoder != "auto" and decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: use 'auto' or one of {sorted(DECODERS)}")
    try:
        return ResizeMode(resize)
    except ValueError:
        raise ValueError(f"resize={resize!r}: use one of {[m.value for m in ResizeMode]}") from None


def _make_embed_spec(
    images: Any, model: Any, size: int, resize: str, batch_size: int, decoder: str,
    runtime: str, num_threads: int | None, output_col: str, columns: ImageColumns,
) -> EmbedSpec:  # fmt: skip
    mode = _check_common(size, batch_size, decoder, resize)
    return EmbedSpec(
        model=embedder_source(model, runtime),
        columns=columns,
        size=size,
        resize=mode,
        batch_size=batch_size,
        decoder=decoder,
        num_threads=_task_threads(images.sparkSession, num_threads),
        output_col=output_col,
    )


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
@renamed_keywords(features_col="output_col")
def embed(
    images: Any,
    *,
    model: Any = None,
    size: int = 224,
    resize: str = "center_crop",
    batch_size: int = 32,
    decoder: str = "auto",
    runtime: str = "auto",
    num_threads: int | None = None,
    output_col: str = "features",
) -> Any:
    """One L2-normalised feature vector per image, computed inside the Spark tasks.

    Parameters
    ----------
    images : DataFrame
        From :func:`read_images` (or any DataFrame with a binary ``content`` column or a
        ``path`` column of file URLs). Every column but ``content`` passes through.
    model : nn.Module, str or ModelSource, optional
        The embedder; it takes uint8 ``(N, size, size, 3)`` RGB and returns ``(N, D)``.
        Default: EfficientNet-Lite0 (ImageNet), 1280 pooled features.
    size : int
        The model's input side.
    resize : str
        ``"center_crop"``, ``"letterbox"`` or ``"stretch"``.
    batch_size : int
        Images per model call.
    decoder : str
        ``"auto"`` (the fastest, measured per worker and format), ``"simplejpeg"``,
        ``"opencv"`` or ``"pillow"``.
    runtime : str
        The default model's runtime: ``"auto"`` (torch or ONNX, whichever measures faster),
        ``"onnx"``, ``"torch"`` or ``"onnx-int8"`` (about twice as fast on CPUs with VNNI;
        features within a cosine of about 0.95 of the float model's).
    num_threads : int, optional
        Threads per task (default ``spark.task.cpus``).
    output_col : str
        Name of the column of features written (``features_col`` is its deprecated old
        name).

    Returns
    -------
    DataFrame
        The input columns but ``content``, then `output_col` (array<float>), ``width``,
        ``height`` and ``error`` (null, or why the image could not be read: such rows have no
        features, and the job goes on).

    Examples
    --------
    >>> features = embed(read_images("/data/photos"))  # doctest: +SKIP
    """
    from pyspark.sql.types import (
        ArrayType,
        FloatType,
        IntegerType,
        StringType,
        StructField,
        StructType,
    )

    columns = _image_columns(images)
    spec = _make_embed_spec(
        images,
        model,
        size,
        resize,
        batch_size,
        decoder,
        runtime,
        num_threads,
        output_col,
        columns,
    )
    kept = [field for field in images.schema.fields if field.name in columns.keep_cols]
    schema = StructType(
        [
            *kept,
            StructField(output_col, ArrayType(FloatType()), True),
            StructField("width", IntegerType(), True),
            StructField("height", IntegerType(), True),
            StructField("error", StringType(), True),
        ]
    )

    def embed_fn(batches):
        return embed_partition(batches, spec)

    return images.mapInArrow(embed_fn, schema)


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def detect(
    images: Any,
    *,
    detector: Any = None,
    class_names: list[str] | None = None,
    classes: list[str] | None = None,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.45,
    input_size: int = 416,
    scales: tuple[float, ...] = (1.0, 0.6),
    with_crops: bool = True,
    embed_crops: bool = False,
    embedder: Any = None,
    embed_size: int = 224,
    decoder: str = "auto",
    num_threads: int | None = None,
    detector_runtime: str = "opencv",
) -> Any:
    """Objects in each image: one row per box, with its crop and, optionally, its features.

    Parameters
    ----------
    images : DataFrame
        From :func:`read_images`.
    detector : callable, optional
        Default YOLOv3-tiny (COCO) run by OpenCV DNN. Otherwise a picklable zero-argument
        factory, called once per Python worker, returning ``image -> list[Box]`` (an
        ``(H, W, 3)`` RGB array to :class:`~deepspark.vision.zoo.Box` objects): wrap a torch,
        TorchScript, ONNX or OpenCV DNN model in it.
    class_names : list of str, optional
        Names of a custom detector's class ids (YOLOv3-tiny uses COCO's).
    classes : list of str, optional
        Keep only these labels.
    score_threshold, iou_threshold : float
        The smallest class score kept, and the overlap above which NMS drops a box.
    input_size, scales : int, tuple of float
        The default detector's input side (rounded up to a multiple of 32), and the sizes
        (fractions of it) each image is seen at.
    with_crops : bool
        Add ``crop``, the box's pixels as JPEG bytes.
    embed_crops : bool
        Add ``features`` of each crop (``embedder``, default EfficientNet-Lite0), decoded once.
    decoder, num_threads
        As in :func:`embed`.
    detector_runtime : str
        What runs the default detector: ``"opencv"`` (OpenCV DNN, the default: nothing to
        export first), ``"torch"``, ``"onnx"`` (ONNX Runtime), ``"auto"``: the fastest of
        those measured here on a batch, once per driver (a few seconds); or ``"onnx-int8"``:
        ONNX with int8 convolutions, about twice as fast on CPUs with VNNI, calibrated once
        per Python worker (a few seconds; needs scikit-image on the workers).

    Returns
    -------
    DataFrame
        The input columns but ``content``, then ``box_index``, ``label``, ``class_id``,
        ``score``, ``box`` (x0, y0, x1, y1 in pixels), ``crop``, ``features`` and ``error``.
        An image that cannot be decoded gives one row with ``error`` set.

    Examples
    --------
    >>> people = detect(read_images("/data/photos"), classes=["person"])  # doctest: +SKIP
    """
    columns = _image_columns(images)
    _check_common(input_size, 1, decoder, "letterbox")
    if not 0.0 <= score_threshold <= 1.0 or not 0.0 <= iou_threshold <= 1.0:
        raise ValueError("score_threshold and iou_threshold must lie in [0, 1]")
    if not scales or any(not 0.1 <= s <= 1.0 for s in scales):
        raise ValueError(f"scales={scales!r}: give fractions of the input side in [0.1, 1]")
    threads = _task_threads(images.sparkSession, num_threads)
    files, factory, key, runtime, class_names = _detector_parts(
        detector, detector_runtime, input_size, class_names
    )
    if classes and class_names:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise ValueError(f"classes={unknown!r} are not among the detector's class names")
    embed_spec = None
    if embed_crops:
        embed_spec = _make_embed_spec(
            images,
            embedder,
            embed_size,
            "stretch",
            32,
            decoder,
            "auto",
            threads,
            "features",
            columns,
        )
    spec = DetectSpec(
        columns=columns, files=files, factory=factory, factory_key=key,
        class_names=tuple(class_names or ()), input_size=input_size, scales=tuple(scales),
        score_threshold=score_threshold, iou_threshold=iou_threshold, classes=tuple(classes or ()),
        with_crops=with_crops, decoder=decoder, num_threads=threads, embed=embed_spec,
        runtime=runtime if runtime != "auto" else "opencv",
    )  # fmt: skip

    def detect_fn(batches):
        return detect_partition(batches, spec)

    return images.mapInArrow(detect_fn, _detect_schema(images, columns, with_crops, embed_crops))


def _detector_parts(
    detector: Any, runtime: str, input_size: int, class_names: list[str] | None
) -> tuple[Any, bytes | None, str, str, list[str] | None]:
    """The default detector's files or a custom detector's pickled factory (and its hash),
    the runtime (``"auto"`` measured here, once), and the class names."""
    if runtime not in ("auto", *DARKNET_RUNTIMES):
        raise ValueError(
            f"detector_runtime={runtime!r}: use 'auto' or one of {', '.join(DARKNET_RUNTIMES)}"
        )
    if detector is None:
        files = yolov3_tiny_files()
        if runtime == "auto":
            runtime = fastest_runtime(files.cfg, files.weights, network_side(input_size))
        elif runtime.startswith("onnx"):
            import_onnxruntime()  # says which extra to install, before a job starts
        with open(files.names) as handle:
            class_names = [line.strip() for line in handle if line.strip()]
        return files, None, "", runtime, class_names
    if callable(detector):
        import cloudpickle

        factory = cloudpickle.dumps(detector)
        return None, factory, hashlib.sha256(factory).hexdigest(), runtime, class_names
    raise TypeError("detector: give None (YOLOv3-tiny) or a factory returning image -> list[Box]")


def _detect_schema(images: Any, columns: Any, with_crops: bool, embed_crops: bool) -> Any:
    """`detect`'s result: the kept input columns, one row per box, its crop and features."""
    from pyspark.sql.types import (
        ArrayType,
        BinaryType,
        FloatType,
        IntegerType,
        StringType,
        StructField,
        StructType,
    )

    kept = [field for field in images.schema.fields if field.name in columns.keep_cols]
    fields = [
        *kept,
        StructField("box_index", IntegerType(), True),
        StructField("label", StringType(), True),
        StructField("class_id", IntegerType(), True),
        StructField("score", FloatType(), True),
        StructField("box", ArrayType(FloatType()), True),
    ]
    if with_crops:
        fields.append(StructField("crop", BinaryType(), True))
    if embed_crops:
        fields.append(StructField("features", ArrayType(FloatType()), True))
    fields.append(StructField("error", StringType(), True))
    return StructType(fields)
