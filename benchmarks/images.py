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
* connector: Spark exports the images to Parquet files, one separate Python process (the
  "GPU cluster", here the CPU, with all cores as threads) runs the same worker code and
  writes features, and Spark imports them back into a table. Its ratio is given twice: as
  run (``ratio_deepspark_vs_connector``), and without the process's start and model load
  (``ratio_deepspark_vs_warm_connector``), as if its model server were already running.

It also measures the models' own cost per image on one thread (no Spark, no files), and from
it the **model bound**: the seconds any path needs on these cores for the model work alone.
``connector_s / model_bound_s`` is then the most any pipeline could gain over the connector
here, and ``decode_only_s / model_bound_s`` the most it could reach of the decode limit.

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

from _common import emit_json, machine, print_table, run_logged, today

CORES = 2
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


def connector(spark, section: str, folder: str, work: str, runtime: str) -> dict[str, float]:
    """Export with Spark, detect and embed in one separate process, import with Spark."""
    export, features, table = (os.path.join(work, name) for name in ("export", "features", "table"))
    start = time.perf_counter()
    spark.read.format("binaryFile").load(folder).select("path", "content").write.mode(
        "overwrite"
    ).parquet(export)
    exported = time.perf_counter()
    command = [sys.executable, os.path.abspath(__file__), "--connector-worker", export, features]
    done = subprocess.run(
        [*command, "--runtime", runtime, "--sections", section, "--launched", str(time.time())],
        capture_output=True,
        text=True,
        timeout=3600,
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
        "process_start_s": report["start_s"],
        "process_model_load_s": report["load_s"],
        "process_work_s": report["work_s"],
        "import_s": imported - processed,
        "rows": spark.read.parquet(table).count(),
    }


def connector_worker(export: str, out: str, runtime: str, section: str, launched: float) -> None:
    """The separate process: all cores as threads, the same worker code as the tasks.

    It reports the seconds from its launch to here (Python and its imports), loading the
    models, and the work itself: a connector whose model server is already running pays only
    the work."""
    start_s = time.time() - launched
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    from deepspark.inference import load_model
    from deepspark.vision.embedder import default_embedder
    from deepspark.vision.image_tasks import (
        DetectSpec,
        EmbedSpec,
        ImageColumns,
        detect_partition,
        embed_partition,
        load_detector,
    )
    from deepspark.vision.zoo import yolov3_tiny_files

    start = time.perf_counter()
    columns = ImageColumns("content", None, ("path",))
    if section == "detect":
        embed = EmbedSpec(default_embedder(runtime), columns, resize="stretch", num_threads=CORES)
        spec = DetectSpec(
            columns, files=yolov3_tiny_files(), with_crops=False, num_threads=CORES, embed=embed,
            runtime=detector_runtime(runtime),
        )  # fmt: skip
        load_detector(spec)
        load_model(embed.model, num_threads=CORES)
        run = detect_partition
    else:
        spec = EmbedSpec(default_embedder(runtime), columns, num_threads=CORES)
        load_model(spec.model, num_threads=CORES)
        run = embed_partition
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    batches = pds.dataset(export, format="parquet").to_batches(batch_size=64)
    writer = None
    for result in run(batches, spec):
        writer = writer or pq.ParquetWriter(out + ".parquet", result.schema)
        writer.write_batch(result)
    if writer is not None:
        writer.close()
    os.makedirs(out, exist_ok=True)
    os.replace(out + ".parquet", os.path.join(out, "part-0.parquet"))
    work_s = time.perf_counter() - start
    print(json.dumps({"start_s": start_s, "load_s": load_s, "work_s": work_s}))


def stage_profile(folder: str, count: int = 32) -> dict[str, float]:
    """Milliseconds per image of each stage, one thread, in this process: where time goes.

    The images are read, decoded and sent through the models stage by stage, the embedder
    in batches of 32 as in the tasks, each model after a warm-up call of the same size.
    """
    import cv2
    import numpy as np
    import torch

    from deepspark.inference import load_model
    from deepspark.vision.darknet import RUNTIMES as DARKNET_RUNTIMES
    from deepspark.vision.decoding import DecoderChooser, fit_image
    from deepspark.vision.embedder import default_embedder
    from deepspark.vision.zoo import DarknetDetector, yolov3_tiny_files

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    files = sorted(os.listdir(folder))[:count]
    detector = DarknetDetector(yolov3_tiny_files(), num_threads=1)
    embedder = load_model(default_embedder("auto"), num_threads=1)
    detector_int8 = DarknetDetector(yolov3_tiny_files(), num_threads=1, runtime="onnx-int8")
    embedder_int8 = load_model(default_embedder("onnx-int8"), num_threads=1)
    for_detect, for_embed = DecoderChooser(min_side=416), DecoderChooser(min_side=224)
    spent: dict[str, float] = {}

    def timed(stage: str, work):
        start = time.perf_counter()
        result = work()
        spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - start
        return result

    def embed_all(pixels: list[np.ndarray], model=embedder) -> None:
        for start in range(0, len(pixels), 32):
            model((torch.from_numpy(np.stack(pixels[start : start + 32])),))

    def read(name: str) -> bytes:
        with open(os.path.join(folder, name), "rb") as handle:
            return handle.read()

    encoded = timed("read", lambda: [read(name) for name in files])
    for chooser in (for_detect, for_embed):  # let each pick its decoder before the clock
        [chooser.decode(data) for data in encoded[:8]]
    decoded = timed("decode", lambda: [for_detect.decode(data) for data in encoded])
    small = timed("decode_small", lambda: [for_embed.decode(data) for data in encoded])
    detector(decoded[0])
    boxes = timed("detect", lambda: [detector(image) for image in decoded])
    crops = [
        fit_image(image[int(b.y0) : int(b.y1) + 1, int(b.x0) : int(b.x1) + 1], 224, "stretch")
        for image, found in zip(decoded, boxes, strict=True)
        for b in found
    ]
    fitted = timed("fit", lambda: [fit_image(image, 224, "center_crop").pixels for image in small])
    detector_int8(decoded[0])
    timed("detect_int8", lambda: [detector_int8(image) for image in decoded])
    crop_pixels = [crop.pixels for crop in crops]
    for suffix, model in (("", embedder), ("_int8", embedder_int8)):
        embed_all(fitted, model)  # a full batch first: buffers are sized on the first one
        timed(f"embed_crops{suffix}", lambda model=model: embed_all(crop_pixels, model))
        timed(f"embed_images{suffix}", lambda model=model: embed_all(fitted, model))
    profile = {f"{key}_ms_per_image": round(1000 * s / len(files), 2) for key, s in spent.items()}
    # The detector's runtimes side by side on 16 images as one batch: three rounds, each in
    # a rotated order, the best round of each kept.
    detectors = {
        runtime: DarknetDetector(yolov3_tiny_files(), num_threads=1, runtime=runtime)
        for runtime in DARKNET_RUNTIMES
    }
    best: dict[str, float] = {}
    for round_index in range(3):
        order = DARKNET_RUNTIMES[round_index:] + DARKNET_RUNTIMES[:round_index]
        for runtime in order:
            detectors[runtime].detect(decoded[:2])
            start = time.perf_counter()
            detectors[runtime].detect(decoded[:16])
            seconds = (time.perf_counter() - start) / len(decoded[:16])
            best[runtime] = min(best.get(runtime, seconds), seconds)
    for runtime, seconds in best.items():
        profile[f"detect_{runtime}_ms_per_image"] = round(1000 * seconds, 2)
    profile["crops_per_image"] = round(len(crops) / len(files), 2)
    profile["decoder_chosen"] = for_detect.chosen.get("jpeg", "")
    return profile


def model_bounds(profile: dict[str, float], count: int) -> dict[str, float]:
    """Seconds the models alone need for ``count`` images on ``CORES`` cores, per section
    (and per section at int8)."""
    per_image = {}
    for suffix in ("", "_int8"):
        per_image[f"detect{suffix}"] = (
            profile[f"detect{suffix}_ms_per_image"] + profile[f"embed_crops{suffix}_ms_per_image"]
        )
        per_image[f"embed{suffix}"] = profile[f"embed_images{suffix}_ms_per_image"]
    return {section: count * ms / 1000 / CORES for section, ms in per_image.items()}


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
    """Decode-only, deepspark and the connector on ``folder`` (each warmed on ``warm``), the
    models run by ``runtime`` (``"onnx-int8"``: both models quantized)."""
    count = len(os.listdir(folder))
    name = f"{section}_int8" if runtime == "onnx-int8" else section
    out = os.path.join(work, name)
    decode_only(spark, section, warm)
    deepspark_pipeline(spark, section, warm, os.path.join(out, "warm_out"), runtime)
    connector(spark, section, warm, os.path.join(out, "warm_connector"), runtime)
    decode_s, decoded = decode_only(spark, section, folder)
    pipeline_s, rows = deepspark_pipeline(spark, section, folder, os.path.join(out, "out"), runtime)
    conn = connector(spark, section, folder, os.path.join(out, "connector"), runtime)
    bound = bounds[name]
    # A connector whose model server already runs: export, the work, import.
    warm_connector = conn["export_s"] + conn["process_work_s"] + conn["import_s"]
    figures = {
        "decode_only_s": round(decode_s, 2),
        "decode_only_images_per_s_per_core": round(decoded / decode_s / CORES, 2),
        "deepspark_s": round(pipeline_s, 2),
        "deepspark_rows": rows,
        "deepspark_images_per_s_per_core": round(count / pipeline_s / CORES, 2),
        "connector_s": round(conn["seconds"], 2),
        "connector_export_s": round(conn["export_s"], 2),
        "connector_process_s": round(conn["process_s"], 2),
        "connector_process_start_s": round(conn["process_start_s"], 2),
        "connector_model_load_s": round(conn["process_model_load_s"], 2),
        "connector_work_s": round(conn["process_work_s"], 2),
        "connector_import_s": round(conn["import_s"], 2),
        "connector_rows": conn["rows"],
        "connector_images_per_s_per_core": round(count / conn["seconds"] / CORES, 2),
        "model_bound_s": round(bound, 2),
        "ratio_deepspark_vs_connector": round(conn["seconds"] / pipeline_s, 3),
        "ratio_deepspark_vs_warm_connector": round(warm_connector / pipeline_s, 3),
        "ratio_deepspark_vs_decode_only": round(decode_s / pipeline_s, 3),
        "ratio_deepspark_vs_model_bound": round(bound / pipeline_s, 3),
        "ceiling_vs_connector": round(conn["seconds"] / bound, 3),
        "ceiling_vs_decode_only": round(decode_s / bound, 3),
    }
    return {f"{name}_{key}": value for key, value in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, for CI and laptops")
    parser.add_argument("--images", type=int, help="images in the comparison (default 160)")
    parser.add_argument("--scale", type=int, help="run the scale test with this many images")
    parser.add_argument(
        "--connector-worker", nargs=2, metavar=("EXPORT", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--sections", default="detect,embed", help="comma-separated: detect, embed (both)"
    )
    parser.add_argument(
        "--precisions", default="fp32,int8", help="comma-separated: fp32, int8 (both)"
    )
    parser.add_argument("--runtime", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if not sections or any(name not in MIN_SIDE for name in sections):
        parser.error(f"--sections={args.sections!r}: give detect, embed or both")
    precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
    if not precisions or any(name not in PRECISIONS for name in precisions):
        parser.error(f"--precisions={args.precisions!r}: give fp32, int8 or both")
    if args.connector_worker:
        connector_worker(*args.connector_worker, args.runtime, sections[0], args.launched)
        return

    import deepspark as ds
    from deepspark.inference import ModelKind
    from deepspark.vision.embedder import default_embedder

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
            profile = stage_profile(folder)
            bounds = model_bounds(profile, count)
            for section in sections:
                for precision in precisions:
                    chosen = runtime if precision == "fp32" else "onnx-int8"
                    results.update(compare(spark, section, warm, folder, work, chosen, bounds))
            results.update(profile)
    finally:
        ds.stop_context()
    results["load_average_1m_after"] = round(os.getloadavg()[0], 2)

    print()
    if args.scale:
        print_table(["images", "seconds", "images/s", "error rows", "worker peak RSS MiB"], [[
            results["scale_images"], results["scale_embed_s"], results["scale_images_per_s"],
            results["scale_error_rows"], results["scale_worker_peak_rss_mib"]]])  # fmt: skip
    else:
        paths = (
            ("decode only (limit)", "decode_only", "ratio_deepspark_vs_decode_only"),
            ("models alone (bound)", "model_bound", "ratio_deepspark_vs_model_bound"),
            ("deepspark", "deepspark", None),
            ("connector", "connector", "ratio_deepspark_vs_connector"),
        )
        names = [
            section + ("_int8" if precision == "int8" else "")
            for section in sections
            for precision in precisions
        ]
        rows = [
            [
                name,
                label,
                results[f"{name}_{key}_s"],
                results.get(f"{name}_{key}_images_per_s_per_core", ""),
                results[f"{name}_{ratio}"] if ratio else 1.0,
            ]
            for name in names
            for label, key, ratio in paths
        ]
        print_table(["section", "path", "seconds", "images/s/core", "vs deepspark"], rows)
    emit_json(results)


if __name__ == "__main__":
    run_logged("images", main)
