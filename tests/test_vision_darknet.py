"""YOLOv3-tiny as a torch module: the same rows and boxes as OpenCV DNN, in torch and in ONNX
Runtime, on real photos; files that do not match are refused; Spark tasks run it."""

from __future__ import annotations

import os

import numpy as np
import pytest
from skimage import data

from deepspark import vision
from deepspark.vision.darknet import (
    EXACT_RUNTIMES,
    DarknetNetwork,
    DarknetRunner,
    fastest_runtime,
)
from deepspark.vision.decoding import encode_jpeg, fit_image
from deepspark.vision.zoo import DarknetDetector, yolov3_tiny_files

PHOTOS = (data.astronaut(), data.chelsea(), data.coffee())


@pytest.fixture(scope="module")
def files():
    return yolov3_tiny_files()


def test_torch_and_onnx_give_opencv_rows_and_boxes(files):
    runners = {
        runtime: DarknetRunner(files.cfg, files.weights, runtime, 1) for runtime in EXACT_RUNTIMES
    }
    for side in (416, 320):
        canvases = np.stack([fit_image(photo, side, "letterbox").pixels for photo in PHOTOS])
        rows = {runtime: runner(canvases) for runtime, runner in runners.items()}
        cells = (side // 32) ** 2 * 3 + (side // 16) ** 2 * 3
        assert rows["opencv"].shape == (3, cells, 85)
        # Something is found (scores above the floor), and the rows agree to float32 noise.
        assert rows["opencv"][:, :, 5:].max() > 0.5
        for runtime in ("torch", "onnx"):
            np.testing.assert_allclose(rows[runtime], rows["opencv"], atol=1e-4)
    found = {
        runtime: DarknetDetector(files, runtime=runtime, num_threads=1).detect(list(PHOTOS))
        for runtime in EXACT_RUNTIMES
    }
    labels = [[box.class_id for box in boxes] for boxes in found["opencv"]]
    assert labels[0][0] == 0 and labels[1][0] == 15  # person, cat
    for runtime in ("torch", "onnx"):
        assert [[box.class_id for box in boxes] for boxes in found[runtime]] == labels
        for theirs, ours in zip(found[runtime], found["opencv"], strict=True):
            for a, b in zip(theirs, ours, strict=True):
                assert np.allclose([a.x0, a.y0, a.x1, a.y1], [b.x0, b.y0, b.x1, b.y1], atol=0.5)
                assert abs(a.score - b.score) < 1e-3
    # One image at a time gives what the batch gives.
    single = DarknetDetector(files, runtime="opencv", num_threads=1)
    assert [single(photo) for photo in PHOTOS] == found["opencv"]
    assert single.detect([]) == []
    assert fastest_runtime(files.cfg, files.weights, 416) in EXACT_RUNTIMES


def _iou(a, b) -> float:
    width = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    height = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = width * height
    area = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0)
    return inter / (area - inter)


def test_int8_detector_finds_what_the_float_one_finds(files):
    # Calibrated on pictures that are not these photos (samples.calibration_photos).
    found = {
        runtime: DarknetDetector(files, runtime=runtime, num_threads=1).detect(list(PHOTOS))
        for runtime in ("onnx", "onnx-int8")
    }
    for exact, int8 in zip(found["onnx"], found["onnx-int8"], strict=True):
        best = max(exact, key=lambda box: box.score)
        same = [box for box in int8 if box.class_id == best.class_id]
        assert same, (best, int8)
        closest = max(same, key=lambda box: box.score)
        assert abs(closest.score - best.score) < 0.1
        assert _iou(closest, best) > 0.6, (closest, best)
    with pytest.raises(ValueError, match="needs calibration canvases"):
        DarknetRunner(files.cfg, files.weights, "onnx-int8")
    odd = DarknetRunner(files.cfg, files.weights, "onnx-int8", 1, np.zeros((2, 320, 320, 3)))
    with pytest.raises(ValueError, match="cannot calibrate 416 x 416"):
        odd(np.zeros((1, 416, 416, 3), np.uint8))


def test_darknet_files_that_do_not_match_are_refused(files, tmp_path):
    with open(files.weights, "rb") as handle:
        head = handle.read(4096)
    short = tmp_path / "short.weights"
    short.write_bytes(head)
    with pytest.raises(ValueError, match="wrong cfg"):
        DarknetNetwork(files.cfg, str(short))
    with open(files.cfg) as handle:
        text = handle.read()
    odd = tmp_path / "odd.cfg"
    odd.write_text(text.replace("[upsample]", "[reorg3d]"))
    with pytest.raises(ValueError, match=r"\[reorg3d\] is not supported"):
        DarknetNetwork(str(odd), files.weights)
    headless = tmp_path / "headless.cfg"
    headless.write_text(text.replace("[net]", "[netx]"))
    with pytest.raises(ValueError, match="does not start with \\[net\\]"):
        DarknetNetwork(str(headless), files.weights)
    with pytest.raises(ValueError, match="runtime='tensorrt'"):
        DarknetRunner(files.cfg, files.weights, "tensorrt")


@pytest.mark.slow
def test_detect_on_spark_with_the_torch_and_int8_runtimes(spark, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        (folder / f"{name}.jpg").write_bytes(encode_jpeg(getattr(data, name)()))
    (folder / "notes.jpg").write_bytes(b"not a picture\n")
    images = vision.read_images(str(folder))
    rows = {}
    for runtime in ("opencv", "torch", "onnx-int8"):
        found = vision.detect(images, with_crops=False, detector_runtime=runtime).collect()
        rows[runtime] = sorted(
            (os.path.basename(r.image_id), r.label, r.error is not None) for r in found
        )
    assert rows["torch"] == rows["opencv"]
    labels = {(name, label) for name, label, _ in rows["torch"]}
    assert {("astronaut.jpg", "person"), ("chelsea.jpg", "cat")} <= labels
    assert ("notes.jpg", None, True) in rows["torch"]
    int8_labels = {(name, label) for name, label, _ in rows["onnx-int8"]}
    assert {("astronaut.jpg", "person"), ("chelsea.jpg", "cat")} <= int8_labels
    assert ("notes.jpg", None, True) in rows["onnx-int8"]
    with pytest.raises(ValueError, match="detector_runtime='cuda'"):
        vision.detect(images, detector_runtime="cuda")
