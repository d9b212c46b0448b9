"""Image pipeline: deepspark.vision against the connector way, and against decoding alone.

One run, the same JPEG files (variants of real photos at product-photo sizes) and the same
models, in two sections:

* ``detect``: YOLOv3-tiny (OpenCV DNN, the fastest of its runtimes here: the profile times
  all three) finds boxes and EfficientNet-Lite0 embeds each crop,
  the issue's pipeline;
* ``embed``: EfficientNet-Lite0 embeds each whole image, what ``dedup`` and ``search`` run.

Each section runs at each of ``--precisions``: ``fp32`` (the defaults) and ``int8`` (both
models quantized, ``detector_runtime="onnx-int8"`` and ``runtime="onnx-int8"``, in every
path alike); the int8 figures carry ``_int8`` after the section's name.

Each section times three paths on the same files:

* decode-only: Spark reads the files and decodes them in the tasks, nothing else (the limit);
* deepspark: ``vision.detect(...)`` or ``vision.embed(...)`` written to Parquet;
* connector: the case the JD.com figure stands for, images shipped from Spark to a separate,
  long-lived inference service. ``benchmarks/connector_server.py`` runs as one process on
  loopback with its models loaded once at start-up and all cores as threads; Spark reads the
  files (``binaryFile``), each task sends its image bytes in requests of 32 over HTTP
  (keep-alive), the server batches the requests that arrive together (dynamic batching, as
  TorchServe and Triton do) and runs the same worker code as deepspark's tasks, and the task
  writes the answers to Parquet.

Protocol (benchmarks/README.md): warm against warm. The server is started and its models
loaded before any timing; every path runs once on a warm-up set; then the three paths take
turns over 3 rounds and the median and range are reported. The server's ``/stats`` after the
rounds (pid, model loads, requests, batches) go into the JSON to show that one warm process
answered everything. Cold is a separate, labelled row (``--cold``): each run the first of a
new SparkContext, the connector also starting its server and loading its models.

It also measures the models' own cost per image on one thread (no Spark, no files), and from
it the **model bound**: the seconds any path needs on these cores for the model work alone.
``connector_s / model_bound_s`` is then the most any pipeline could gain over the connector
here, and ``decode_only_s / model_bound_s`` the most it could reach of the decode limit.

``--scale N`` instead pushes N generated images
(and one corrupt file) through read, decode and embed, and records the Python workers' peak
RSS. The last line printed is one JSON object with the figures and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    emit_json,
    interleaved_rounds,
    machine,
    print_table,
    run_logged,
    speed_ratio,
    today,
    warm_up,
)
from connector_server import ServerProcess, client_fn
from image_profile import model_bounds, stage_profile

CORES = 2
ROUNDS = 3
LONG_SIDE = 640  # product photos: a few hundred pixels to a side


def make_images(folder: str, count: int, seed: int) -> int:
    from deepspark.vision.samples import write_near_duplicates

    return len(write_near_duplicates(folder, count=count, seed=seed, long_side=LONG_SIDE))


def _decode_only_fn(min_side: int):
    def decode_batches(batches):
        import pyarrow as pa

        from deepspark.vision.decoding import DecoderChooser, ImageError

        chooser = DecoderChooser(min_side=min_side)
        for batch in batches:
            decoded = 0
            for data in batch.column("content").to_pylist():
                try:
                    chooser.decode(data)
                    decoded += 1
                except ImageError:
                    pass
            yield pa.RecordBatch.from_pydict({"decoded": pa.array([decoded], pa.int64())})

    return decode_batches


MIN_SIDE = {"detect": 416, "embed": 224}
"""The smallest decoded side each section needs (a JPEG may be decoded reduced down to it)."""


def decode_only(spark, section: str, folder: str) -> tuple[float, int]:
    from deepspark import vision

    start = time.perf_counter()
    images = vision.read_images(folder)
    decode = _decode_only_fn(MIN_SIDE[section])
    counts = images.mapInArrow(decode, "decoded long").groupBy().sum().first()[0]
    return time.perf_counter() - start, int(counts)


PRECISIONS = ("fp32", "int8")


def detector_runtime(runtime: str) -> str:  # int8 with int8, else the default
    return "onnx-int8" if runtime == "onnx-int8" else "opencv"


def deepspark_pipeline(spark, section: str, folder: str, out: str, runtime: str):
    from deepspark import vision

    start = time.perf_counter()
    images = vision.read_images(folder)
    if section == "detect":
        result = vision.detect(
            images,
            embed_crops=True,
            with_crops=False,
            detector_runtime=detector_runtime(runtime),
            embedder=vision.default_embedder(runtime) if runtime == "onnx-int8" else None,
        )
    else:
        result = vision.embed(images, runtime=runtime)
    result.write.mode("overwrite").parquet(out)
    seconds = time.perf_counter() - start
    return seconds, spark.read.parquet(out).count()


def connector_frame(spark, folder: str, server: ServerProcess):
    """The connector path's DataFrame: Spark reads the files, its tasks call the server."""
    import pyarrow as pa
    from pyspark.sql.pandas.types import from_arrow_schema

    files = spark.read.format("binaryFile").load(folder).select("path", "content")
    # The answer's schema, from one request made on the driver (the server is warm anyway).
    sample = files.limit(1).toArrow().to_batches()
    answered = pa.Table.from_batches(list(client_fn(server.url)(iter(sample))))
    return files.mapInArrow(client_fn(server.url), from_arrow_schema(answered.schema))


def connector_pipeline(spark, folder: str, out: str, server: ServerProcess):
    start = time.perf_counter()
    connector_frame(spark, folder, server).write.mode("overwrite").parquet(out)
    seconds = time.perf_counter() - start
    return seconds, spark.read.parquet(out).count()


class PeakRss:
    """Samples the resident memory of the Spark JVM's Python workers (and the driver)."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.worker_peak = 0
        self.driver_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.wait(0.5):
            try:
                children = me.children(recursive=True)
                python = [p for p in children if "python" in (p.name() or "").lower()]
                worst = max((p.memory_info().rss for p in python), default=0)
                self.worker_peak = max(self.worker_peak, worst)
                self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue


def scale_run(spark, count: int, work: str) -> dict[str, object]:
    from deepspark import vision

    folder = os.path.join(work, "scale")
    start = time.perf_counter()
    make_images(folder, count, seed=99)
    with open(os.path.join(folder, "zz_corrupt.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0" + os.urandom(4096))
    generate_s = time.perf_counter() - start
    out = os.path.join(work, "scale_features")
    with PeakRss() as rss:
        start = time.perf_counter()
        vision.embed(vision.read_images(folder)).write.mode("overwrite").parquet(out)
        seconds = time.perf_counter() - start
    table = spark.read.parquet(out)
    return {
        "scale_images": count,
        "scale_generate_s": round(generate_s, 1),
        "scale_embed_s": round(seconds, 1),
        "scale_images_per_s": round(count / seconds, 2),
        "scale_rows": table.count(),
        "scale_error_rows": table.where("error IS NOT NULL").count(),
        "scale_worker_peak_rss_mib": round(rss.worker_peak / 2**20, 1),
        "scale_driver_peak_rss_mib": round(rss.driver_peak / 2**20, 1),
    }


def compare(
    spark, section: str, warm: str, folder: str, work: str, runtime: str, bounds: dict
) -> dict[str, object]:
    """Decode-only, deepspark and the warm connector server on ``folder``, each warmed on
    ``warm``, interleaved over ``ROUNDS`` rounds; the models run by ``runtime``
    (``"onnx-int8"``: both models quantized)."""
    count = len(os.listdir(folder))
    name = f"{section}_int8" if runtime == "onnx-int8" else section
    out = os.path.join(work, name)
    with ServerProcess(section, runtime, threads=CORES) as server:
        started = server.stats()

        def paths(source: str) -> dict:
            return {
                "decode_only": lambda: decode_only(spark, section, source),
                "deepspark": lambda: deepspark_pipeline(
                    spark, section, source, os.path.join(out, "deepspark"), runtime
                ),
                "connector": lambda: connector_pipeline(
                    spark, source, os.path.join(out, "connector"), server
                ),
            }

        warm_up(paths(warm))
        timed = interleaved_rounds(paths(folder), ROUNDS)
        rows = {
            "deepspark": spark.read.parquet(os.path.join(out, "deepspark")).count(),
            "connector": spark.read.parquet(os.path.join(out, "connector")).count(),
        }
        ended = server.stats()
    bound = bounds[name]
    figures: dict[str, object] = {
        "images": count,
        **timed,
        "deepspark_rows": rows["deepspark"],
        "connector_rows": rows["connector"],
        "connector_server": {
            "start_s": round(server.start_s, 2),
            "model_load_s": round(started["load_s"], 2),
            "pid_same_throughout": started["pid"] == ended["pid"],
            "model_loads": ended["model_loads"],
            "requests": ended["requests"],
            "batches": ended["batches"],
        },
        "model_bound_s": round(bound, 2),
        "ratio_deepspark_vs_warm_connector": speed_ratio(timed["deepspark"], timed["connector"]),
        "ratio_deepspark_vs_decode_only": speed_ratio(timed["deepspark"], timed["decode_only"]),
        "ratio_deepspark_vs_model_bound": round(bound / timed["deepspark"]["median_s"], 3),
        "images_per_s_per_core": {
            path: round(count / timed[path]["median_s"] / CORES, 2) for path in timed
        },
    }
    return {name: figures}


def compare_cold(spark_args: dict, section: str, folder: str, work: str, runtime: str) -> dict:
    """The cold row, apart from the warm comparison: every run the first of a new
    SparkContext (new Python workers, models loaded again); the connector also starts its
    server process and loads its models inside the timed run."""
    import deepspark as ds

    out = os.path.join(work, f"cold_{section}")

    def fresh_session():
        ds.stop_context()
        spark = ds.init_context(**spark_args)
        spark.sparkContext.setLogLevel("ERROR")
        return spark

    def deepspark_cold() -> None:
        spark = fresh_session()
        deepspark_pipeline(spark, section, folder, os.path.join(out, "deepspark"), runtime)

    def connector_cold() -> None:
        spark = fresh_session()
        with ServerProcess(section, runtime, threads=CORES) as server:
            connector_pipeline(spark, folder, os.path.join(out, "connector"), server)

    timed = interleaved_rounds({"deepspark": deepspark_cold, "connector": connector_cold}, ROUNDS)
    return {
        f"{section}_cold": {
            **timed,
            "ratio_deepspark_vs_cold_connector": speed_ratio(
                timed["deepspark"], timed["connector"]
            ),
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, for CI and laptops")
    parser.add_argument("--images", type=int, help="images in the comparison (default 160)")
    parser.add_argument("--scale", type=int, help="run the scale test with this many images")
    parser.add_argument(
        "--sections", default="detect,embed", help="comma-separated: detect, embed (both)"
    )
    parser.add_argument(
        "--precisions", default="fp32,int8", help="comma-separated: fp32, int8 (both)"
    )
    parser.add_argument(
        "--cold", action="store_true", help="also the cold row (new sessions, server started)"
    )
    args = parser.parse_args()
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if not sections or any(name not in MIN_SIDE for name in sections):
        parser.error(f"--sections={args.sections!r}: give detect, embed or both")
    precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
    if not precisions or any(name not in PRECISIONS for name in precisions):
        parser.error(f"--precisions={args.precisions!r}: give fp32, int8 or both")

    import deepspark as ds
    from deepspark.inference import ModelKind
    from deepspark.vision.embedder import default_embedder

    count = args.images or (32 if args.quick else 160)
    results: dict[str, object] = {
        "benchmark": "images",
        "quick": args.quick,
        "cores": CORES,
        "rounds": ROUNDS,
        "date": today(),
        "machine": machine(),
        "load_average_1m_before": round(os.getloadavg()[0], 2),
    }
    work = tempfile.mkdtemp(prefix="bench-images-")
    spark_args = {"cores": CORES, "driver_memory": "4g", "app_name": "benchmark-images"}
    spark = ds.init_context(**spark_args)
    spark.sparkContext.setLogLevel("ERROR")
    try:
        if args.scale:
            results.update(scale_run(spark, args.scale, work))
        else:
            runtime = "onnx" if default_embedder("auto").kind is ModelKind.ONNX else "torch"
            results["embedder_runtime"] = runtime
            warm, folder = os.path.join(work, "warm"), os.path.join(work, "images")
            make_images(warm, 8, seed=1)
            results["images"] = make_images(folder, count, seed=2)
            profile = stage_profile(folder, sections, precisions)
            bounds = model_bounds(profile, count, CORES)
            for section in sections:
                for precision in precisions:
                    chosen = runtime if precision == "fp32" else "onnx-int8"
                    results.update(compare(spark, section, warm, folder, work, chosen, bounds))
            if args.cold:
                for section in sections:
                    results.update(compare_cold(spark_args, section, folder, work, runtime))
            results["profile"] = profile
    finally:
        ds.stop_context()
    results["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    if not args.scale:
        results["targets"] = {
            f"{name}_ge_1x_warm_connector": results[name]["ratio_deepspark_vs_warm_connector"][
                "median"
            ]
            >= 1.0
            for name in results
            if isinstance(results[name], dict)
            and "ratio_deepspark_vs_warm_connector" in results[name]
        }

    print()
    if args.scale:
        print_table(["images", "seconds", "images/s", "error rows", "worker peak RSS MiB"], [[
            results["scale_images"], results["scale_embed_s"], results["scale_images_per_s"],
            results["scale_error_rows"], results["scale_worker_peak_rss_mib"]]])  # fmt: skip
    else:
        rows = []
        for name, block in results.items():
            if not isinstance(block, dict) or "deepspark" not in block:
                continue
            for path in ("decode_only", "deepspark", "connector"):
                if path in block:
                    ratio = speed_ratio(block["deepspark"], block[path])["median"]
                    rows.append([name, path, block[path]["median_s"], block[path]["spread"], ratio])
        print_table(["section", "path", "median s", "spread max/min", "deepspark vs it"], rows)
    emit_json(results)


if __name__ == "__main__":
    run_logged("images", main)
