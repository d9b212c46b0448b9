"""Near-duplicates found on Spark: pairs of a set whose truth is known by construction (real
photos, each cropped, rescaled, flipped, colour-shifted and re-encoded), groups of duplicates,
and exact and FAISS search."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from deepspark import vision
from deepspark.vision.samples import write_near_duplicates

THRESHOLD = 0.6


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """54 JPEG files (18 photos, each with 2 variants) and a broken one."""
    folder = tmp_path_factory.mktemp("near_duplicates")
    written = write_near_duplicates(str(folder / "images"), 2, seed=11)
    (folder / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    return folder, {f"file:{image.path}": image.photo for image in written}


@pytest.fixture
def sample_set(spark, sample_files):
    """The sample files' features, embedded on Spark once per module."""
    folder, photo_of = sample_files
    table = folder / "features"
    if not table.exists():
        images = vision.read_images(str(folder / "images"), num_partitions=2)
        vision.embed(images).write.parquet(str(table))
    return spark.read.parquet(str(table)), photo_of


def _true_pairs(photo_of: dict[str, str]) -> set[tuple[str, str]]:
    return {
        (a, b) for a, b in itertools.combinations(sorted(photo_of), 2) if photo_of[a] == photo_of[b]
    }


def _precision_recall(features, photo_of: dict[str, str]) -> tuple[float, float]:
    pairs = vision.near_duplicates(features, threshold=THRESHOLD).collect()
    assert all(row.similarity >= THRESHOLD - 1e-6 for row in pairs)
    found = {(row.id_a, row.id_b) for row in pairs}
    truth = _true_pairs(photo_of)
    hits = len(found & truth)
    return hits / max(1, len(found)), hits / len(truth)


@pytest.mark.slow
def test_duplicate_pairs_have_precision_and_recall_above_095(sample_set):
    features, photo_of = sample_set
    errors = features.where("error IS NOT NULL").collect()
    assert [os.path.basename(row.image_id) for row in errors] == ["broken.jpg"]
    precision, recall = _precision_recall(features, photo_of)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


@pytest.mark.slow
def test_int8_features_keep_precision_and_recall_above_095(spark, sample_files):
    folder, photo_of = sample_files
    images = vision.read_images(str(folder / "images"), num_partitions=2)
    features = vision.embed(images, runtime="onnx-int8").cache()
    assert features.where("error IS NULL").count() == len(photo_of)
    precision, recall = _precision_recall(features, photo_of)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    with pytest.raises(ValueError, match="runtime='int4'"):
        vision.embed(images, runtime="int4")


@pytest.mark.slow
def test_groups_are_the_photos(sample_set):
    features, photo_of = sample_set
    groups = vision.duplicate_groups(vision.near_duplicates(features, threshold=THRESHOLD))
    members: dict[str, set[str]] = {}
    for row in groups.collect():
        members.setdefault(row.group_id, set()).add(row.image_id)
    by_photo: dict[str, set[str]] = {}
    for image_id, photo in photo_of.items():
        by_photo.setdefault(photo, set()).add(image_id)
    matched = sum(1 for group in members.values() if group in by_photo.values())
    assert matched >= 0.95 * len(by_photo), (matched, len(by_photo))


@pytest.mark.slow
def test_exact_and_faiss_search_find_the_other_variants(sample_set):
    features, photo_of = sample_set
    queries = features.where(features.image_id.rlike("_00003[0-5]\\.jpg$"))  # 6 variants
    exact = vision.search(features, queries, k=3).collect()
    index = vision.FeatureIndex.build(features)
    assert index.index.ntotal == len(photo_of)
    approx = vision.search(features, queries, k=3, index=index).collect()
    assert len(exact) == 18 and {r.query_id for r in exact} == {r.query_id for r in approx}
    for row in exact:  # the image itself, then its two variants
        assert photo_of[row.image_id] == photo_of[row.query_id], row
    assert {(r.query_id, r.image_id) for r in exact} == {(r.query_id, r.image_id) for r in approx}
    best = {(r.query_id, r.rank): r.similarity for r in exact}
    for row in approx:
        assert abs(best[row.query_id, row.rank] - row.similarity) < 1e-4


def test_lsh_pairs_equal_the_exact_pairs(spark):
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(12, 48))
    vectors = centres.repeat(3, axis=0) + rng.normal(scale=0.35, size=(36, 48))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"v{i:02d}" for i in range(36)]
    frame = spark.createDataFrame(
        [(i, v.tolist()) for i, v in zip(ids, vectors, strict=True)],
        "image_id string, features array<float>",
    )
    similarity = vectors @ vectors.T
    exact = {
        (ids[a], ids[b]) for a, b in itertools.combinations(range(36), 2) if similarity[a, b] >= 0.7
    }
    found = vision.near_duplicates(frame, threshold=0.7).collect()
    assert {(r.id_a, r.id_b) for r in found} == exact and len(exact) >= 30
    for row in found:
        assert abs(row.similarity - similarity[ids.index(row.id_a), ids.index(row.id_b)]) < 1e-5


def test_groups_follow_chains(spark):
    pairs = spark.createDataFrame(
        [("c", "d"), ("a", "b"), ("b", "c"), ("x", "y"), ("d", "e")], "id_a string, id_b string"
    )
    rows = vision.duplicate_groups(pairs).collect()
    assert {r.image_id: (r.group_id, r.group_size) for r in rows} == {
        **{node: ("a", 5) for node in "abcde"},
        **{node: ("x", 2) for node in "xy"},
    }


def test_bad_arguments_are_refused(spark):
    frame = spark.createDataFrame([("a", [1.0, 0.0])], "image_id string, features array<float>")
    with pytest.raises(ValueError, match="threshold=1.5"):
        vision.near_duplicates(frame, threshold=1.5)
    with pytest.raises(ValueError, match="feature_cols='vec'"):
        vision.near_duplicates(frame, feature_cols="vec")
    with pytest.raises(ValueError, match="the one column of feature arrays"):
        vision.near_duplicates(frame, feature_cols=["features", "features"])
    with pytest.raises(ValueError, match="k=0"):
        vision.search(frame, frame, k=0)
