"""``deepspark-images``: the image pipeline from the command line, for people who do not write
Spark code.

    deepspark-images embed  PHOTOS --out FEATURES [--detect] [--model FILE]
    deepspark-images dedup  FEATURES --out PAIRS [--threshold 0.6] [--groups GROUPS]
    deepspark-images search FEATURES --query IMAGES [--k 5] [--faiss] [--out RESULTS]

Each command starts a local Spark session (or uses ``--master``), shows Spark's progress bar
while its jobs run, writes Parquet (Delta when installed) and prints one summary line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


INT8_HELP = (
    "run the default models quantized to int8 (about twice as fast on CPUs with VNNI, "
    "features within about 0.04 of cosine similarity)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepspark-images",
        description="Read images, detect objects, embed them and find near-duplicates on Spark.",
    )
    parser.add_argument("--master", help="Spark master URL (default: local, all cores)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="one feature vector per image (or per object)")
    embed.add_argument("source", help="a folder or glob of images, or a Parquet/Delta table")
    embed.add_argument("--out", required=True, help="where to write the feature table")
    embed.add_argument("--content-col", help="column of image bytes, for a table source")
    embed.add_argument("--path-col", help="column of image paths, for a table source")
    embed.add_argument("--detect", action="store_true", help="detect objects, embed each crop")
    embed.add_argument(
        "--model", help="embedder file (TorchScript or ONNX; default EfficientNet-Lite0)"
    )
    embed.add_argument("--int8", action="store_true", help=INT8_HELP)
    embed.add_argument("--size", type=int, default=224, help="model input side (default 224)")
    embed.add_argument(
        "--resize", default="center_crop", choices=["center_crop", "letterbox", "stretch"]
    )
    embed.add_argument("--partitions", type=int, help="spread the images over this many tasks")
    embed.add_argument("--format", default="auto", choices=["auto", "parquet", "delta"])

    dedup = commands.add_parser("dedup", help="near-duplicate pairs and groups")
    dedup.add_argument("features", help="a feature table written by `embed`")
    dedup.add_argument("--out", required=True, help="where to write the pairs")
    dedup.add_argument("--threshold", type=float, default=0.6, help="cosine similarity (0.6)")
    dedup.add_argument("--groups", help="also write the groups of duplicates here")
    dedup.add_argument("--format", default="auto", choices=["auto", "parquet", "delta"])

    search = commands.add_parser("search", help="the most similar images for query images")
    search.add_argument("features", help="a feature table written by `embed`")
    search.add_argument("--query", required=True, help="a query image, folder or glob")
    search.add_argument("--k", type=int, default=5, help="results per query (5)")
    search.add_argument("--faiss", action="store_true", help="search through a FAISS index")
    search.add_argument("--model", help="the embedder the feature table was made with")
    search.add_argument("--int8", action="store_true", help="the table was made with --int8")
    search.add_argument("--out", help="write the results here instead of printing them")
    search.add_argument("--format", default="auto", choices=["auto", "parquet", "delta"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deepspark-images`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "int8", False) and args.model:
        parser.error("--int8 quantizes the default models; drop it or --model")
    from pyspark.sql import SparkSession

    import deepspark as ds

    started = SparkSession.getActiveSession() is None
    conf = {"spark.ui.showConsoleProgress": str(not args.no_progress).lower()}
    if started:
        spark = ds.init_context(_cluster_mode(args.master), master=args.master, conf=conf)
    else:
        # A session that is already running keeps its own progress setting (a static conf).
        spark = SparkSession.getActiveSession()
    try:
        return {"embed": _embed, "dedup": _dedup, "search": _search}[args.command](spark, args)
    finally:
        if started:
            ds.stop_context()


def _cluster_mode(master: str | None) -> str:
    """The deepspark cluster mode a ``--master`` URL belongs to."""
    from deepspark.context.topology import parse_master

    if master is None:
        return "local"
    mode = parse_master(master).mode
    if mode is None:
        raise SystemExit(f"deepspark-images: --master {master!r} is not a Spark master URL")
    return mode.value


def _say(text: str) -> None:
    print(f"deepspark-images: {text}", file=sys.stderr, flush=True)


def _images(
    spark: Any,
    source: str,
    content_col: str | None = None,
    path_col: str | None = None,
    partitions: int | None = None,
) -> Any:
    from deepspark import vision

    if content_col or path_col:
        table_format = "delta" if source.rstrip("/").endswith("delta") else "parquet"
        return vision.read_images(
            source,
            spark=spark,
            format=table_format,
            content_col=content_col,
            path_col=path_col,
            num_partitions=partitions,
        )
    return vision.read_images(source, spark=spark, num_partitions=partitions)


def _embedder_runtime(args: argparse.Namespace) -> str:
    return "onnx-int8" if args.int8 else "auto"


def _embed(spark: Any, args: argparse.Namespace) -> int:
    from deepspark import vision
    from deepspark.vision.tables import write_table

    start = time.perf_counter()
    images = _images(spark, args.source, args.content_col, args.path_col, args.partitions)
    runtime = _embedder_runtime(args)
    if args.detect:
        table = vision.detect(
            images,
            embed_crops=True,
            embedder=vision.default_embedder(runtime) if args.int8 else args.model,
            with_crops=False,
            detector_runtime="onnx-int8" if args.int8 else "opencv",
        )
    else:
        table = vision.embed(
            images, model=args.model, size=args.size, resize=args.resize, runtime=runtime
        )
    written = write_table(table, args.out, format=args.format)
    saved = spark.read.format(written).load(args.out)
    rows = saved.count()
    errors = saved.where("error IS NOT NULL").count()
    seconds = time.perf_counter() - start
    _say(f"{rows} rows ({errors} unreadable) written to {args.out} as {written} in {seconds:.1f} s")
    return 0


def _dedup(spark: Any, args: argparse.Namespace) -> int:
    from deepspark import vision
    from deepspark.vision.tables import read_table, write_table

    start = time.perf_counter()
    features = read_table(spark, args.features)
    pairs = vision.near_duplicates(features, threshold=args.threshold)
    written = write_table(pairs, args.out, format=args.format)
    pairs = spark.read.format(written).load(args.out)
    message = f"{pairs.count()} pairs at cosine >= {args.threshold} written to {args.out}"
    if args.groups:
        groups = vision.duplicate_groups(pairs)
        write_table(groups, args.groups, format=args.format)
        count = spark.read.format(written).load(args.groups).select("group_id").distinct().count()
        message += f"; {count} groups written to {args.groups}"
    _say(f"{message} in {time.perf_counter() - start:.1f} s")
    return 0


def _search(spark: Any, args: argparse.Namespace) -> int:
    from deepspark import vision
    from deepspark.vision.tables import read_table, write_table

    features = read_table(spark, args.features)
    queries = vision.embed(
        vision.read_images(args.query, spark=spark),
        model=args.model,
        runtime=_embedder_runtime(args),
    )
    index = vision.FeatureIndex.build(features) if args.faiss else None
    found = vision.search(features, queries, k=args.k, index=index)
    if args.out:
        written = write_table(found, args.out, format=args.format)
        _say(f"results written to {args.out} as {written}")
    else:
        for row in found.orderBy("query_id", "rank").collect():
            print(f"{row.query_id}\t{row.rank}\t{row.image_id}\t{row.similarity:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
