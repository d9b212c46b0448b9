"""Image pipeline: deepspark.vision against the connector way, and against decoding alone.

One run, the same JPEG files (variants of real photos at product-photo sizes) and the same
models (YOLOv3-tiny by OpenCV DNN, EfficientNet-Lite0 features per crop):

* decode-only: Spark reads the files and decodes them in the tasks, nothing else (the limit);
* deepspark: ``vision.detect(read_images(folder), embed_crops=True)`` written to Parquet;
* connector: Spark exports the images to Parquet files, one separate Python process (the
  "GPU cluster", here the CPU, with all cores as threads) detects and embeds with the same
  worker code and writes features, and Spark imports them back into a table.

Each path runs once on a warm-up set first. ``--scale N`` instead pushes N generated images
(and one corrupt file) through read, decode and embed, and records the Python workers' peak
RSS. The last line printed is one JSON object with the figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit_json, machine, print_table, today

CORES = 2
LONG_SIDE = 640  # product photos: a few hundred pixels to a side


def make_images(folder: str, count: int, seed: int) -> int:
    from deepspark.vision.samples import write_near_duplicates

    return len(write_near_duplicates(folder, count=count, seed=seed, long_side=LONG_SIDE))


def _decode_only_fn(batches):
    import pyarrow as pa

    from deepspark.vision.decoding import DecoderChooser, ImageError

    chooser = DecoderChooser(min_side=416)
    for batch in batches:
        decoded = 0
        for data in batch.column("content").to_pylist():
            try:
                chooser.decode(data)
                decoded += 1
            except ImageError:
                pass
        yield pa.RecordBatch.from_pydict({"decoded": pa.array([decoded], pa.int64())})


def decode_only(spark, folder: str) -> tuple[float, int]:
    from deepspark import vision

    start = time.perf_counter()
    images = vision.read_images(folder)
    counts = images.mapInArrow(_decode_only_fn, "decoded long").groupBy().sum().first()[0]
    return time.perf_counter() - start, int(counts)


def deepspark_pipeline(spark, folder: str, out: str) -> tuple[float, int]:
    from deepspark import vision

    start = time.perf_counter()
    images = vision.read_images(folder)
    vision.detect(images, embed_crops=True, with_crops=False).write.mode("overwrite").parquet(out)
    seconds = time.perf_counter() - start
    return seconds, spark.read.parquet(out).count()


def connector(spark, folder: str, work: str, runtime: str) -> dict[str, float]:
    """Export with Spark, detect and embed in one separate process, import with Spark."""
    export, features, table = (os.path.join(work, name) for name in ("export", "features", "table"))
    start = time.perf_counter()
    spark.read.format("binaryFile").load(folder).select("path", "content").write.mode(
        "overwrite"
    ).parquet(export)
    exported = time.perf_counter()
    command = [sys.executable, os.path.abspath(__file__), "--connector-worker", export, features]
    done = subprocess.run(
        [*command, "--runtime", runtime], capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(f"connector process failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    processed = time.perf_counter()
    spark.read.parquet(features).write.mode("overwrite").parquet(table)
    imported = time.perf_counter()
    return {
        "seconds": imported - start,
        "export_s": exported - start,
        "process_s": processed - exported,
        "process_model_load_s": report["load_s"],
        "import_s": imported - processed,
        "rows": spark.read.parquet(table).count(),
    }


def connector_worker(export: str, out: str, runtime: str) -> None:
    """The separate process: all cores as threads, the same worker code as the tasks."""
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    from deepspark.vision.image_tasks import DetectSpec, EmbedSpec, ImageColumns, detect_partition
    from deepspark.vision.images import default_embedder
    from deepspark.vision.zoo import yolov3_tiny_files

    start = time.perf_counter()
    columns = ImageColumns("content", None, ("path",))
    embed = EmbedSpec(default_embedder(runtime), columns, resize="stretch", num_threads=CORES)
    spec = DetectSpec(
        columns, files=yolov3_tiny_files(), with_crops=False, num_threads=CORES, embed=embed
    )
    load_s = time.perf_counter() - start
    batches = pds.dataset(export, format="parquet").to_batches(batch_size=64)
    writer = None
    for result in detect_partition(batches, spec):
        writer = writer or pq.ParquetWriter(out + ".parquet", result.schema)
        writer.write_batch(result)
    if writer is not None:
        writer.close()
    os.makedirs(out, exist_ok=True)
    os.replace(out + ".parquet", os.path.join(out, "part-0.parquet"))
    print(json.dumps({"load_s": load_s}))


def stage_profile(folder: str, count: int = 12) -> dict[str, float]:
    """Milliseconds per image of each stage, one thread, in this process: where time goes."""
    import torch

    from deepspark.inference import load_model
    from deepspark.vision.decoding import DecoderChooser, fit_image
    from deepspark.vision.images import default_embedder
    from deepspark.vision.zoo import DarknetDetector, yolov3_tiny_files

    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    files = sorted(os.listdir(folder))[:count]
    detector = DarknetDetector(yolov3_tiny_files(), num_threads=1)
    embedder = load_model(default_embedder("auto"), num_threads=1)
    chooser = DecoderChooser(min_side=416)
    spent = {"read": 0.0, "decode": 0.0, "detect": 0.0, "embed_crops": 0.0}
    crops = 0
    for name in files:
        t0 = time.perf_counter()
        with open(os.path.join(folder, name), "rb") as handle:
            data = handle.read()
        t1 = time.perf_counter()
        image = chooser.decode(data)
        t2 = time.perf_counter()
        boxes = detector(image)
        t3 = time.perf_counter()
        pixels = [
            fit_image(
                image[int(b.y0) : int(b.y1) + 1, int(b.x0) : int(b.x1) + 1], 224, "stretch"
            ).pixels
            for b in boxes
        ]
        if pixels:
            embedder((torch.from_numpy(__import__("numpy").stack(pixels)),))
        t4 = time.perf_counter()
        crops += len(boxes)
        for key, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[key] += seconds
    profile = {f"{key}_ms_per_image": round(1000 * s / len(files), 2) for key, s in spent.items()}
    profile["crops_per_image"] = round(crops / len(files), 2)
    profile["decoder_chosen"] = chooser.chosen.get("jpeg", "")
    return profile


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, for CI and laptops")
    parser.add_argument("--images", type=int, help="images in the comparison (default 160)")
    parser.add_argument("--scale", type=int, help="run the scale test with this many images")
    parser.add_argument(
        "--connector-worker", nargs=2, metavar=("EXPORT", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--runtime", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.connector_worker:
        connector_worker(*args.connector_worker, args.runtime)
        return

    import deepspark as ds
    from deepspark.inference import ModelKind
    from deepspark.vision.images import default_embedder

    count = args.images or (32 if args.quick else 160)
    results: dict[str, object] = {
        "benchmark": "images",
        "quick": args.quick,
        "cores": CORES,
        "date": today(),
        "machine": machine(),
        "load_average_1m_before": round(os.getloadavg()[0], 2),
    }
    work = tempfile.mkdtemp(prefix="bench-images-")
    spark = ds.init_context(cores=CORES, driver_memory="4g", app_name="benchmark-images")
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
            decode_only(spark, warm)
            deepspark_pipeline(spark, warm, os.path.join(work, "warm_out"))
            connector(spark, warm, os.path.join(work, "warm_connector"), runtime)
            decode_s, decoded = decode_only(spark, folder)
            pipeline_s, rows = deepspark_pipeline(spark, folder, os.path.join(work, "out"))
            conn = connector(spark, folder, os.path.join(work, "connector"), runtime)
            results.update(
                decode_only_s=round(decode_s, 2),
                decode_only_images_per_s_per_core=round(decoded / decode_s / CORES, 2),
                deepspark_s=round(pipeline_s, 2),
                deepspark_rows=rows,
                deepspark_images_per_s_per_core=round(count / pipeline_s / CORES, 2),
                connector_s=round(conn["seconds"], 2),
                connector_export_s=round(conn["export_s"], 2),
                connector_process_s=round(conn["process_s"], 2),
                connector_model_load_s=round(conn["process_model_load_s"], 2),
                connector_import_s=round(conn["import_s"], 2),
                connector_rows=conn["rows"],
                connector_images_per_s_per_core=round(count / conn["seconds"] / CORES, 2),
                ratio_deepspark_vs_connector=round(conn["seconds"] / pipeline_s, 3),
                ratio_deepspark_vs_connector_without_model_load=round(
                    (conn["seconds"] - conn["process_model_load_s"]) / pipeline_s, 3
                ),
                ratio_deepspark_vs_decode_only=round(decode_s / pipeline_s, 3),
            )
            results.update(stage_profile(folder))
    finally:
        ds.stop_context()
    results["load_average_1m_after"] = round(os.getloadavg()[0], 2)

    print()
    if args.scale:
        print_table(["images", "seconds", "images/s", "error rows", "worker peak RSS MiB"], [[
            results["scale_images"], results["scale_embed_s"], results["scale_images_per_s"],
            results["scale_error_rows"], results["scale_worker_peak_rss_mib"]]])  # fmt: skip
    else:
        print_table(["path", "seconds", "images/s/core", "vs deepspark"], [
            ["decode only (limit)", results["decode_only_s"],
             results["decode_only_images_per_s_per_core"],
             results["ratio_deepspark_vs_decode_only"]],
            ["deepspark", results["deepspark_s"], results["deepspark_images_per_s_per_core"], 1.0],
            ["connector", results["connector_s"], results["connector_images_per_s_per_core"],
             results["ratio_deepspark_vs_connector"]],
        ])  # fmt: skip
    emit_json(results)


if __name__ == "__main__":
    main()
