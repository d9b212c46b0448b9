"""Near-duplicate pairs, groups of duplicates and similarity search over a feature table.

Driver side. Pairs come from Spark ML's ``BucketedRandomProjectionLSH`` similarity join on
L2-normalised features: for unit vectors, cosine similarity ``s`` and Euclidean distance
``d`` meet in ``d**2 = 2 - 2 s``, so "cosine at least t" is "distance at most sqrt(2 - 2t)",
and Spark re-checks every candidate pair's exact distance. Groups are the connected
components of the pair graph, found by min-label propagation with DataFrame joins. Search is
exact on Spark (a dot product per candidate, top k per query) or through a FAISS index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepspark.deprecation import renamed_keywords

__all__ = ["FeatureIndex", "duplicate_groups", "near_duplicates", "search"]

_MAX_ROUNDS = 64


def _feature_column(feature_cols: str | Sequence[str]) -> str:
    """The one column of feature arrays named by `feature_cols` (a name, or a list of one)."""
    names = [feature_cols] if isinstance(feature_cols, str) else list(feature_cols)
    if len(names) != 1 or not isinstance(names[0], str):
        raise ValueError(f"feature_cols={feature_cols!r}: give the one column of feature arrays")
    return names[0]


def _valid(features: Any, id_col: str, feature_col: str) -> Any:
    from pyspark.sql import functions as F

    for argument, name in (("id_col", id_col), ("feature_cols", feature_col)):
        if name not in features.columns:
            raise ValueError(
                f"{argument}={name!r} is not a column of features (columns: {features.columns}); "
                "give the output of vision.embed or name the columns"
            )
    frame = features.where(F.col(feature_col).isNotNull())
    if "error" in features.columns:
        frame = frame.where(F.col("error").isNull())
    return frame


def _unit_vectors(frame: Any, id_col: str, feature_col: str) -> Any:
    from pyspark.ml.feature import Normalizer
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    vectors = frame.select(F.col(id_col).alias("id"), array_to_vector(feature_col).alias("raw"))
    return (
        Normalizer(inputCol="raw", outputCol="vector", p=2.0)
        .transform(vectors)
        .select("id", "vector")
    )


@renamed_keywords(features_col="feature_cols")
def near_duplicates(
    features: Any,
    threshold: float = 0.6,
    *,
    id_col: str = "image_id",
    feature_cols: str | Sequence[str] = "features",
    num_hash_tables: int = 8,
    bucket_length: float | None = None,
    seed: int = 7,
) -> Any:
    """Every pair of images whose cosine similarity is at least ``threshold``.

    Parameters
    ----------
    features : DataFrame
        One row per image with an id and an array of floats (the output of
        :func:`~deepspark.vision.embed`); rows with an ``error`` are left out.
    threshold : float
        The smallest cosine similarity of a duplicate pair, in (0, 1]. With the default
        EfficientNet-Lite0 features, 0.6 separates crops, rescales, flips, colour shifts and
        JPEG re-encodings of a photo from other photos (measured on
        :mod:`deepspark.vision.samples`: variants >= 0.57, different photos <= 0.51).
    id_col : str
        The column of ids.
    feature_cols : str
        The column of feature arrays (a list of that one name is accepted too).
    num_hash_tables, bucket_length : int, float
        LSH settings: more tables find more candidate pairs; the bucket length defaults to
        twice the spread, along one random direction, of a pair at the threshold.
    seed : int
        The LSH's random seed.

    Returns
    -------
    DataFrame
        ``id_a``, ``id_b`` (``id_a < id_b``) and ``similarity``, each pair once.

    Examples
    --------
    >>> pairs = near_duplicates(vision.embed(images), threshold=0.8)  # doctest: +SKIP
    """
    from pyspark.ml.feature import BucketedRandomProjectionLSH
    from pyspark.sql import functions as F

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r}: give a cosine similarity in (0, 1]")
    if num_hash_tables < 1:
        raise ValueError(f"num_hash_tables={num_hash_tables!r}: give at least 1")
    feature_col = _feature_column(feature_cols)
    vectors = _unit_vectors(_valid(features, id_col, feature_col), id_col, feature_col)
    max_distance = math.sqrt(max(0.0, 2.0 - 2.0 * threshold))
    if bucket_length is None:
        first = vectors.first()
        dimension = len(first["vector"]) if first is not None else 1
        # One random direction sees a pair at distance d spread by about d / sqrt(dimension).
        bucket_length = max(1e-3, 2.0 * max(max_distance, 1e-3) / math.sqrt(dimension))
    lsh = BucketedRandomProjectionLSH(
        inputCol="vector", outputCol="hashes", bucketLength=bucket_length,
        numHashTables=num_hash_tables, seed=seed,
    )  # fmt: skip
    model = lsh.fit(vectors)
    # A hair of slack so pairs exactly at the threshold survive float rounding.
    joined = model.approxSimilarityJoin(vectors, vectors, max_distance + 1e-6, distCol="distance")
    return (
        joined.where(F.col("datasetA.id") < F.col("datasetB.id"))
        .select(
            F.col("datasetA.id").alias("id_a"),
            F.col("datasetB.id").alias("id_b"),
            (F.lit(1.0) - F.col("distance") * F.col("distance") / 2.0).alias("similarity"),
        )
        .where(F.col("similarity") >= threshold - 1e-6)
    )


def duplicate_groups(pairs: Any, *, checkpoint: bool = True) -> Any:
    """Groups of duplicates: the connected components of the pairs' graph.

    Each image that is in at least one pair gets ``group_id``, the smallest id of its group.
    Labels spread along the edges (every image takes the smallest label among itself and its
    neighbours) until no label changes.

    Parameters
    ----------
    pairs : DataFrame
        ``id_a``, ``id_b`` (from :func:`near_duplicates`).
    checkpoint : bool
        Cut each round's lineage (``localCheckpoint``) so long chains do not grow the plan.

    Returns
    -------
    DataFrame
        ``image_id``, ``group_id``, ``group_size``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    for name in ("id_a", "id_b"):
        if name not in pairs.columns:
            raise ValueError(
                f"pairs has columns {pairs.columns}: give the output of near_duplicates"
            )
    edges = pairs.select(F.col("id_a").alias("src"), F.col("id_b").alias("dst"))
    edges = edges.unionByName(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst")))
    edges = edges.localCheckpoint() if checkpoint else edges.cache()
    labels = edges.select(F.col("src").alias("node")).distinct().withColumn("label", F.col("node"))
    for _ in range(_MAX_ROUNDS):
        offered = edges.join(labels, edges.src == labels.node).select(
            F.col("dst").alias("node"), F.col("label").alias("offer")
        )
        updated = labels.join(
            offered.groupBy("node").agg(F.min("offer").alias("offer")), "node", "left"
        ).select(
            "node",
            F.least("label", F.coalesce("offer", "label")).alias("label"),
            F.col("label").alias("before"),
        )
        updated = updated.localCheckpoint() if checkpoint else updated.cache()
        changed = updated.where(F.col("label") != F.col("before")).limit(1).count()
        labels = updated.select("node", "label")
        if changed == 0:
            break
    else:
        raise RuntimeError(
            f"duplicate_groups did not settle in {_MAX_ROUNDS} rounds (a chain longer than that)"
        )
    window = Window.partitionBy("label")
    return labels.select(
        F.col("node").alias("image_id"),
        F.col("label").alias("group_id"),
        F.count("*").over(window).alias("group_size"),
    )


@renamed_keywords(features_col="feature_cols")
def search(
    features: Any,
    queries: Any,
    k: int = 5,
    *,
    id_col: str = "image_id",
    feature_cols: str | Sequence[str] = "features",
    index: FeatureIndex | None = None,
) -> Any:
    """The ``k`` most similar images of ``features`` for each query, by cosine similarity.

    Parameters
    ----------
    features : DataFrame
        The feature table searched (the output of :func:`~deepspark.vision.embed`).
    queries : DataFrame
        Query images' features, with the same id and feature columns.
    k : int
        Results per query.
    id_col, feature_cols : str
        The columns of ids and feature arrays, as in :func:`near_duplicates`.
    index : FeatureIndex, optional
        Answer through this FAISS index (built from ``features``) instead of exactly on Spark.

    Returns
    -------
    DataFrame
        ``query_id``, ``rank`` (1 = most similar), ``image_id``, ``similarity``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: give a positive integer")
    feature_col = _feature_column(feature_cols)
    query_rows = _valid(queries, id_col, feature_col)
    if index is not None:
        found = index.search_frame(query_rows, k, id_col=id_col, feature_col=feature_col)
        return queries.sparkSession.createDataFrame(
            found, "query_id string, rank int, image_id string, similarity double"
        )
    table = _unit_vectors(_valid(features, id_col, feature_col), id_col, feature_col)
    asked = _unit_vectors(query_rows, id_col, feature_col)
    from pyspark.ml.functions import vector_to_array

    table = table.select(F.col("id").alias("image_id"), vector_to_array("vector").alias("v"))
    asked = asked.select(F.col("id").alias("query_id"), vector_to_array("vector").alias("q"))
    dot = F.aggregate(
        F.zip_with("q", "v", lambda a, b: a * b), F.lit(0.0).cast("double"), lambda acc, x: acc + x
    )
    scored = asked.crossJoin(table).select("query_id", "image_id", dot.alias("similarity"))
    ranked = scored.withColumn(
        "rank",
        F.row_number().over(
            Window.partitionBy("query_id").orderBy(F.desc("similarity"), "image_id")
        ),
    )
    return ranked.where(F.col("rank") <= k).select("query_id", "rank", "image_id", "similarity")


class FeatureIndex:
    """A FAISS inner-product index over a feature table, held on the driver.

    Built from the table in chunks (``toLocalIterator``), so the driver holds the vectors
    once, in FAISS. Exact (``IndexFlatIP``) by default; ``factory`` takes any FAISS index
    factory string (e.g. ``"HNSW32,Flat"``) for larger tables.
    """

    def __init__(self, index: Any, ids: list[str]) -> None:
        self.index = index
        self.ids = ids

    @classmethod
    @renamed_keywords(features_col="feature_cols")
    def build(
        cls,
        features: Any,
        *,
        id_col: str = "image_id",
        feature_cols: str | Sequence[str] = "features",
        factory: str = "Flat",
    ) -> FeatureIndex:
        try:
            import faiss
        except ImportError as err:
            raise ImportError("FAISS search needs faiss: run `pip install faiss-cpu`") from err
        feature_col = _feature_column(feature_cols)
        rows = _valid(features, id_col, feature_col).select(id_col, feature_col)
        index, ids, chunk = None, [], []
        for row in rows.toLocalIterator():
            ids.append(str(row[0]))
            chunk.append(row[1])
            if len(chunk) == 4096:
                index = cls._add(faiss, index, chunk, factory)
                chunk = []
        if chunk:
            index = cls._add(faiss, index, chunk, factory)
        if index is None:
            raise ValueError("features has no rows with features to index")
        return cls(index, ids)

    @staticmethod
    def _add(faiss: Any, index: Any, chunk: list, factory: str) -> Any:
        vectors = _normalised(np.asarray(chunk, dtype=np.float32))
        if index is None:
            index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index.train(vectors)
        index.add(vectors)
        return index

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Similarities ``(Q, k)`` and the ids of the ``k`` nearest vectors for each query."""
        scores, positions = self.index.search(_normalised(np.asarray(vectors, dtype=np.float32)), k)
        return scores, [[self.ids[p] for p in row if p >= 0] for row in positions]

    def search_frame(self, queries: Any, k: int, *, id_col: str, feature_col: str):
        import pandas as pd

        rows = queries.select(id_col, feature_col).collect()
        if not rows:
            return pd.DataFrame({"query_id": [], "rank": [], "image_id": [], "similarity": []})
        scores, ids = self.search(np.asarray([row[1] for row in rows]), k)
        records = [
            (str(row[0]), rank + 1, image_id, float(scores[q, rank]))
            for q, row in enumerate(rows)
            for rank, image_id in enumerate(ids[q])
        ]
        return pd.DataFrame(records, columns=["query_id", "rank", "image_id", "similarity"])


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))
