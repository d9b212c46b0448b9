"""Image tasks leave the user's session settings as they were, on success and on error."""

from __future__ import annotations

import sys

import cloudpickle
import numpy as np
import pytest
from skimage import data

from deepspark import vision
from deepspark.vision.decoding import encode_jpeg
from deepspark.vision.zoo import Box

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ARROW_ROWS = "spark.sql.execution.arrow.maxRecordsPerBatch"


class WholeImage:
    """A stand-in detector: one box over every image."""

    class_names = ("all",)

    def __call__(self, image: np.ndarray) -> list[Box]:
        height, width = image.shape[:2]
        return [Box(0.0, 0.0, float(width), float(height), 0.9, 0)]


@pytest.fixture
def user_arrow_rows(spark):
    """The session's Arrow batch size set to a user's own value, put back afterwards."""
    before = spark.conf.get(ARROW_ROWS)
    spark.conf.set(ARROW_ROWS, "5000")
    yield "5000"
    spark.conf.set(ARROW_ROWS, before)


def test_embed_and_detect_leave_the_arrow_batch_size_as_the_user_set_it(
    spark, tmp_path, user_arrow_rows
):
    for name, photo in (("coffee", data.coffee()), ("chelsea", data.chelsea())):
        (tmp_path / f"{name}.jpg").write_bytes(encode_jpeg(photo))
    images = vision.read_images(str(tmp_path))
    features = vision.embed(images, runtime="torch", batch_size=2)
    assert spark.conf.get(ARROW_ROWS) == user_arrow_rows
    rows = features.collect()
    assert len(rows) == 2 and all(len(row.features) == 1280 for row in rows)
    boxes = vision.detect(images, detector=WholeImage, with_crops=False).collect()
    assert len(boxes) == 2
    assert spark.conf.get(ARROW_ROWS) == user_arrow_rows


def test_a_refused_image_call_leaves_the_session_as_it_was(spark, tmp_path, user_arrow_rows):
    (tmp_path / "coffee.jpg").write_bytes(encode_jpeg(data.coffee()))
    images = vision.read_images(str(tmp_path))
    with pytest.raises(ValueError, match="batch_size"):
        vision.embed(images, batch_size=0)
    with pytest.raises(ValueError, match="unicorn"):
        vision.detect(images, classes=["unicorn"])
    assert spark.conf.get(ARROW_ROWS) == user_arrow_rows
