"""The image pipeline on Spark: read images, detect objects, embed, find near-duplicates.

Driver side: :func:`read_images`, :func:`embed`, :func:`detect` (:mod:`.images`);
:func:`default_embedder` (:mod:`.embedder`);
:func:`near_duplicates`, :func:`duplicate_groups`, :func:`search`, :class:`FeatureIndex`
(:mod:`.similarity`); :func:`write_table`, :func:`read_table` (:mod:`.tables`).
Worker side (no pyspark): :mod:`.decoding` (decoders, resizing), :mod:`.zoo` (the default
models), :mod:`.image_tasks` (the work inside a task), :mod:`.samples` (a test image set).
Needs ``pip install 'deepspark[vision]'``.
"""

from deepspark.vision.decoding import DECODERS, DecoderChooser, ImageError, ResizeMode, decode_image
from deepspark.vision.embedder import default_embedder
from deepspark.vision.images import detect, embed, read_images
from deepspark.vision.similarity import FeatureIndex, duplicate_groups, near_duplicates, search
from deepspark.vision.tables import read_table, write_table
from deepspark.vision.zoo import Box, DarknetDetector, EfficientNetLite0Features, yolov3_tiny_files

__all__ = [
    "DECODERS",
    "Box",
    "DarknetDetector",
    "DecoderChooser",
    "EfficientNetLite0Features",
    "FeatureIndex",
    "ImageError",
    "ResizeMode",
    "decode_image",
    "default_embedder",
    "detect",
    "duplicate_groups",
    "embed",
    "near_duplicates",
    "read_images",
    "read_table",
    "search",
    "write_table",
    "yolov3_tiny_files",
]
