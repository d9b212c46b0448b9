"""``deepspark-images``: embed, dedup and search from the command line, on the test session."""

from __future__ import annotations

import os

import pytest
import torch
from skimage import data

from deepspark.vision.cli import main
from deepspark.vision.decoding import encode_jpeg


class ColourHistogram(torch.nn.Module):
    """A cheap embedder saved as TorchScript: 8 bins per channel."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        bins = (images.long() // 32).flatten(1, 2)  # (N, pixels, 3)
        counts = [torch.nn.functional.one_hot(bins[:, :, c], 8).float().mean(1) for c in range(3)]
        return torch.cat(counts, dim=1)


def _photos_with_copies(folder, names: tuple[str, ...], top: int = 0):
    """Each photo as JPEG, and a copy mirrored, less its ``top`` rows, at another quality."""
    folder.mkdir()
    for name in names:
        photo = getattr(data, name)()
        (folder / f"{name}.jpg").write_bytes(encode_jpeg(photo))
        (folder / f"{name}_copy.jpg").write_bytes(encode_jpeg(photo[top:, ::-1], quality=70))
    return folder


@pytest.mark.slow
def test_embed_dedup_and_search_from_the_command_line(spark, tmp_path, capsys):
    photos = _photos_with_copies(tmp_path / "photos", ("astronaut", "coffee", "chelsea"))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nothing")
    model = tmp_path / "histogram.pt"
    torch.jit.save(torch.jit.script(ColourHistogram()), str(model))
    features, pairs, groups = (str(tmp_path / name) for name in ("features", "pairs", "groups"))

    assert (
        main(["embed", str(photos), "--out", features, "--model", str(model), "--size", "64"]) == 0
    )
    assert "7 rows (1 unreadable) written to" in capsys.readouterr().err
    table = spark.read.parquet(features)
    assert len(table.where("error IS NULL").first().features) == 24

    # A flipped copy has the same colour histogram: each photo pairs with its copy.
    assert main(["dedup", features, "--out", pairs, "--threshold", "0.99", "--groups", groups]) == 0
    found = {
        (os.path.basename(r.id_a), os.path.basename(r.id_b))
        for r in spark.read.parquet(pairs).collect()
    }
    assert found >= {(f"{n}.jpg", f"{n}_copy.jpg") for n in ("astronaut", "coffee", "chelsea")}
    assert "groups written to" in capsys.readouterr().err

    query = str(photos / "coffee_copy.jpg")
    assert main(["search", features, "--query", query, "--k", "2", "--model", str(model)]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [os.path.basename(line[2]) for line in lines] == ["coffee_copy.jpg", "coffee.jpg"]
    assert float(lines[0][3]) > 0.99  # the same file (decoders may differ by a level)


def test_bad_commands_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "somewhere"])  # --out missing
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_embed_and_search_from_the_command_line(spark, tmp_path, capsys):
    photos = _photos_with_copies(tmp_path / "photos", ("rocket", "coffee", "chelsea"), top=20)
    features = str(tmp_path / "features")
    assert main(["embed", str(photos), "--out", features, "--int8"]) == 0
    assert "6 rows (0 unreadable) written to" in capsys.readouterr().err
    assert len(spark.read.parquet(features).first().features) == 1280
    query = str(photos / "rocket_copy.jpg")
    assert main(["search", features, "--query", query, "--k", "2", "--int8"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [os.path.basename(line[2]) for line in lines] == ["rocket_copy.jpg", "rocket.jpg"]
    assert float(lines[0][3]) > 0.99
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(photos), "--out", features, "--int8", "--model", "m.onnx"])
    assert exit_info.value.code == 2
    assert "--int8 quantizes the default models" in capsys.readouterr().err
