"""Reading and decoding images: the decoders on real photos, broken files as error rows, and
images from folders, Parquet columns of bytes and columns of paths on a real Spark session."""

from __future__ import annotations

import os
import sys

import cloudpickle
import cv2
import numpy as np
import pytest
import torch
from skimage import data

from deepspark import vision
from deepspark.vision.decoding import (
    DecoderChooser,
    ImageError,
    available_decoders,
    decode_image,
    encode_jpeg,
    fit_image,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ColourStats(torch.nn.Module):
    """A cheap embedder: each channel's mean and spread, so Spark tests run in seconds."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float().flatten(1, 2)
        return torch.cat([pixels.mean(1), pixels.std(1), torch.ones(len(images), 1)], dim=1)


def _png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return buffer.tobytes()


def test_every_decoder_reads_a_real_photo_alike():
    photo = data.astronaut()
    jpeg, png = encode_jpeg(photo, 95), _png(photo)
    decoded = {name: decode_image(jpeg, name) for name in available_decoders()}
    assert set(decoded) == {"simplejpeg", "opencv", "pillow"}
    for image in decoded.values():
        assert image.shape == (512, 512, 3)
        assert np.abs(image.astype(int) - photo).mean() < 3  # JPEG at quality 95
    for name in ("opencv", "pillow"):
        np.testing.assert_array_equal(decode_image(png, name), photo)  # PNG is lossless


@pytest.mark.parametrize("name", ["simplejpeg", "opencv", "pillow"])
def test_decoding_reduced_keeps_the_asked_side(name):
    image = decode_image(encode_jpeg(data.astronaut()), name, min_side=100)
    assert image.shape == (128, 128, 3)  # 512 / 4: the largest reduction that keeps >= 100


def test_chooser_measures_each_format_and_keeps_the_fastest():
    chooser = DecoderChooser(trials=2)
    for photo in (data.astronaut(), data.coffee(), data.chelsea()):
        assert chooser.decode(encode_jpeg(photo)).shape == photo.shape
    chooser.decode(_png(data.coffee()))
    assert chooser.chosen["jpeg"] in {"simplejpeg", "opencv", "pillow"}
    assert set(chooser.timings["jpeg"]) >= {"simplejpeg", "opencv", "pillow"}
    assert "simplejpeg" not in chooser.timings["png"]  # it reads JPEG only


def test_broken_bytes_raise_the_reason():
    jpeg = encode_jpeg(data.coffee())
    chooser = DecoderChooser(trials=1)
    chooser.decode(jpeg)
    with pytest.raises(ImageError, match="broken jpeg file"):
        chooser.decode(jpeg[:40])
    with pytest.raises(ImageError, match="not an image"):
        chooser.decode(b"just some text, not pixels")
    with pytest.raises(ImageError, match="empty file"):
        chooser.decode(b"")


def test_fit_image_modes_keep_aspect_or_fill():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :100] = 255
    crop = fit_image(image, 50, "center_crop")
    assert crop.pixels.shape == (50, 50, 3) and crop.scale == 0.5 and crop.offset_x == -25
    box = fit_image(image, 50, "letterbox")
    assert box.pixels.shape == (50, 50, 3)
    assert (box.pixels[:12] == 114).all() and (box.pixels[38:] == 114).all()  # grey bands
    assert box.pixels[25, :24].min() == 255 and box.pixels[25, 26:].max() == 0
    assert fit_image(image, 50, "stretch").pixels.shape == (50, 50, 3)


def _write_photos(folder) -> dict[str, np.ndarray]:
    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    os.makedirs(folder, exist_ok=True)
    for name, photo in photos.items():
        with open(os.path.join(folder, f"{name}.jpg"), "wb") as handle:
            handle.write(encode_jpeg(photo[::4, ::4]))
    return photos


def _expected(folder, name) -> np.ndarray:
    with open(os.path.join(folder, f"{name}.jpg"), "rb") as handle:
        # Decoded reduced, as the task does; decoders differ a little, hence the tolerance.
        image = decode_image(handle.read(), "opencv", min_side=32)
    pixels = fit_image(image, 32, "center_crop").pixels
    out = ColourStats()(torch.from_numpy(pixels[None]))[0].numpy()
    return out / np.linalg.norm(out)


def test_folder_with_broken_files_gives_error_rows_not_a_failed_job(spark, tmp_path):
    folder = tmp_path / "photos"
    _write_photos(folder)
    (folder / "truncated.jpg").write_bytes(encode_jpeg(data.rocket())[:300])
    (folder / "notes.txt").write_text("not an image")
    images = vision.read_images(str(folder), num_partitions=2)
    rows = {
        os.path.basename(row.image_id): row
        for row in vision.embed(images, model=ColourStats(), size=32).collect()
    }
    assert set(rows) == {"astronaut.jpg", "coffee.jpg", "chelsea.jpg", "truncated.jpg", "notes.txt"}
    assert "broken jpeg" in rows["truncated.jpg"].error and rows["truncated.jpg"].features is None
    assert "not an image" in rows["notes.txt"].error
    for name in ("astronaut", "coffee", "chelsea"):
        row = rows[f"{name}.jpg"]
        assert row.error is None
        np.testing.assert_allclose(row.features, _expected(folder, name), atol=5e-3)
    assert (rows["coffee.jpg"].height, rows["coffee.jpg"].width) == (100, 150)


def test_images_from_a_parquet_column_and_from_a_column_of_paths(spark, tmp_path):
    folder = tmp_path / "photos"
    photos = _write_photos(folder)
    names = sorted(photos)
    table = spark.createDataFrame(
        [(name, (folder / f"{name}.jpg").read_bytes()) for name in names],
        "name string, data binary",
    )
    table.write.parquet(str(tmp_path / "table"))
    from_bytes = vision.read_images(
        str(tmp_path / "table"), format="parquet", content_col="data", id_col="name"
    )
    paths = spark.createDataFrame(
        [(str(folder / f"{name}.jpg"),) for name in [*names, "missing"]], "uri string"
    )
    from_paths = vision.read_images(paths, path_col="uri")
    by_bytes = {
        r.image_id: r for r in vision.embed(from_bytes, model=ColourStats(), size=32).collect()
    }
    by_path = {
        r.image_id: r for r in vision.embed(from_paths, model=ColourStats(), size=32).collect()
    }
    assert sorted(by_bytes) == names
    for name in names:
        np.testing.assert_allclose(
            by_bytes[name].features, by_path[str(folder / f"{name}.jpg")].features
        )
    assert "cannot read" in by_path[str(folder / "missing.jpg")].error


def test_bad_arguments_are_refused_on_the_driver(spark, tmp_path):
    frame = spark.createDataFrame([("a",)], "name string")
    with pytest.raises(ValueError, match="content_col="):
        vision.read_images(frame)
    with pytest.raises(ValueError, match="content_col='nope' is not a column"):
        vision.read_images(frame, content_col="nope")
    images = vision.read_images(frame, path_col="name")
    with pytest.raises(ValueError, match="size=4"):
        vision.embed(images, model=ColourStats(), size=4)
    with pytest.raises(ValueError, match="decoder='gif'"):
        vision.embed(images, model=ColourStats(), decoder="gif")
    with pytest.raises(TypeError, match="model: give None"):
        vision.embed(images, model=42)
