"""Data feed speed: DataFrame partitions to torch batches, against reading Parquet directly.

One run, same machine, same data (a Parquet source of N rows x 64 float32 features + a label,
then a 28x28 image-array variant), batches of 256:

* (a) the limit: one Python process reads the source Parquet with pyarrow (one thread) into
  torch batches, in file order;
* (b) the peer path (Petastorm, Horovod): Spark materialises the DataFrame to Parquet, then
  two reader processes (started and warmed beforehand) read it into torch batches;
  materialisation counted;
* (c) deepspark: ``spark.read.parquet(...).coalesce(2).mapInArrow(...)``; each of the 2 tasks
  spills its partition and runs shuffled epochs of `PartitionSpill.epoch`. First epoch: from
  job submission until both tasks finished epoch 0 (reading, Arrow transfer and spill
  included). Later epochs: rows per second per task (one core each), best later epoch.

"Per core" figures are rows per CPU second of the process doing the work (the reader in
(a), each task's Python worker in (c); both single-threaded), so that other load on a shared
machine does not tilt the ratio; wall-clock figures are reported beside them (``*_wall``),
with the load average. Speed figures take the best of repeated passes. Peak RSS is the
high-water mark (``VmHWM``) of a task's Python process while it feeds, reset at task start;
``feed_rss_mb`` subtracts the process's resident size before the feed began (interpreter,
torch and pyarrow already loaded). ``spark_read_s`` (full runs) is Spark reading the source
alone (a ``noop`` write over the same 2 partitions): the floor under both (b) and (c).

Targets: (c) later epochs >= 0.8x (a) per core; (c) first epoch >= 2x faster than (b);
a task's peak RSS under 2x one batch + 200 MB with a partition 10x that size (the full image
variant). The last line printed is one JSON object with the figures.

Usage: python benchmarks/feed.py [--quick] [--rows N] [--image-rows N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit_json, machine, print_table, run_logged, today

BATCH = 256
FILES = 8
FEATURES = 64
IMAGE_SHAPE = (1, 28, 28)


@dataclass
class Variant:
    name: str
    column: str
    shape: tuple[int, ...]
    rows: int

    @property
    def width(self) -> int:
        return int(np.prod(self.shape))

    @property
    def row_bytes(self) -> int:
        return self.width * 4 + 8


# --- data -----------------------------------------------------------------------------------


def write_source(variant: Variant, directory: str) -> list[str]:
    """The data as it lives before training: Parquet files, features as array<float>."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    chunk = min(65_536, variant.rows)
    noise = rng.standard_normal(chunk * variant.width, dtype=np.float32)
    paths = []
    per_file = -(-variant.rows // FILES)
    for index in range(FILES):
        start, stop = index * per_file, min(variant.rows, (index + 1) * per_file)
        if start >= stop:
            break
        path = os.path.join(directory, f"part-{index:03d}.parquet")
        schema = pa.schema([(variant.column, pa.list_(pa.float32())), ("label", pa.int64())])
        with pq.ParquetWriter(path, schema, compression="snappy") as writer:
            for first in range(start, stop, chunk):
                count = min(chunk, stop - first)
                shift = rng.integers(0, chunk - count + 1) * variant.width
                values = noise[shift : shift + count * variant.width]
                offsets = np.arange(0, values.size + 1, variant.width, dtype=np.int32)
                column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
                labels = pa.array(np.arange(first, first + count, dtype=np.int64))
                writer.write_table(pa.table({variant.column: column, "label": labels}))
        paths.append(path)
    return paths


def parquet_files(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".parquet")
    )


# --- (a) and (b): pyarrow reading Parquet into torch batches ------------------------------


def read_into_batches(paths: list[str], column: str, shape: tuple[int, ...]) -> dict:
    """Read Parquet files into torch batches of BATCH rows with one thread; time it."""
    import torch

    pa.set_cpu_count(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = checksum = 0
    for path in paths:
        source = pq.ParquetFile(path)
        for batch in source.iter_batches(BATCH, columns=[column, "label"], use_threads=False):
            values = batch.column(0).flatten().to_numpy()
            features = torch.from_numpy(values.reshape(batch.num_rows, *shape))
            labels = torch.from_numpy(batch.column(1).to_numpy())
            rows += features.shape[0]
            checksum += int(labels.sum())
    return {
        "rows": rows,
        "checksum": checksum,
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
    }


def _warm_up(_: int) -> int:
    import torch  # noqa: F401 - loaded before the clock starts

    time.sleep(0.5)  # keep this worker busy so that the other request starts the second one
    return os.getpid()


def limit(variant: Variant, source: str, repeats: int) -> dict:
    runs = [read_into_batches(parquet_files(source), variant.column, variant.shape)]
    for _ in range(repeats - 1):
        runs.append(read_into_batches(parquet_files(source), variant.column, variant.shape))
    best = min(runs, key=lambda run: run["cpu_s"])
    best["rows_per_cpu_s"] = best["rows"] / best["cpu_s"]
    best["rows_per_wall_s"] = max(run["rows"] / run["wall_s"] for run in runs)
    return best


def materialise_then_read(spark, variant: Variant, source: str, target: str, pool) -> dict:
    """What Petastorm/Horovod users do: write the DataFrame out, then read it back."""
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    spark.read.parquet(source).write.parquet(target)
    written = time.perf_counter()
    files = parquet_files(target)
    halves = [files[0::2], files[1::2]]
    futures = [
        pool.submit(read_into_batches, half, variant.column, variant.shape) for half in halves
    ]
    results = [future.result() for future in futures]
    finished = time.perf_counter()
    shutil.rmtree(target, ignore_errors=True)
    return {
        "materialise_s": written - started,
        "read_s": finished - written,
        "total_s": finished - started,
        "rows": sum(r["rows"] for r in results),
        "checksum": sum(r["checksum"] for r in results),
    }


# --- (c): deepspark inside 2 Spark tasks ----------------------------------------------------


def deepspark_tasks(spark, variant: Variant, source: str, epochs: int) -> dict:
    from deepspark.data import resolve_specs

    df = spark.read.parquet(source).coalesce(2)
    features = resolve_specs(
        df, variant.column, role="feature", shapes={variant.column: variant.shape}
    )
    labels = resolve_specs(df, "label", role="label")

    def task(batches):
        # Everything the task needs is imported here, in the Python worker.
        import json
        import os
        import time

        import pyarrow as pa
        import torch

        from deepspark.data import PartitionSpill, plan_steps

        def status_mb(key: str) -> float:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024
            return 0.0

        torch.set_num_threads(1)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the high-water mark: measure this task alone
        baseline = status_mb("VmRSS")
        task_started = time.time()
        report = {"epoch_s": [], "epoch_cpu_s": [], "checksums": []}
        with PartitionSpill.write(batches) as spill:
            report["spill_s"] = time.time() - task_started
            rows = spill.num_rows()
            plan = plan_steps([rows], BATCH)
            for epoch in range(epochs):
                started, cpu_started = time.perf_counter(), time.process_time()
                checksum = 0
                for batch in spill.epoch(features, labels, plan=plan, rank=0, epoch=epoch, seed=42):
                    checksum += int(batch.labels[0][: batch.num_real].sum())
                report["epoch_s"].append(time.perf_counter() - started)
                report["epoch_cpu_s"].append(time.process_time() - cpu_started)
                report["checksums"].append(checksum)
                if epoch == 0:
                    report["epoch0_done"] = time.time()
        report.update(
            rows=rows,
            peak_rss_mb=status_mb("VmHWM"),
            baseline_rss_mb=baseline,
            pid=os.getpid(),
        )
        yield pa.record_batch({"report": [json.dumps(report)]})

    submitted = time.time()
    reports = df.mapInArrow(task, "report string").collect()
    finished = time.time()
    import json

    tasks = [json.loads(row.report) for row in reports]
    later = [min(t["epoch_s"][1:] or t["epoch_s"]) for t in tasks]
    later_cpu = [min(t["epoch_cpu_s"][1:] or t["epoch_cpu_s"]) for t in tasks]
    return {
        "tasks": tasks,
        "first_epoch_s": max(t["epoch0_done"] for t in tasks) - submitted,
        "job_s": finished - submitted,
        "later_rows_per_wall_s": float(
            np.mean([t["rows"] / s for t, s in zip(tasks, later, strict=True)])
        ),
        "later_rows_per_cpu_s": float(
            np.mean([t["rows"] / s for t, s in zip(tasks, later_cpu, strict=True)])
        ),
        "rows": sum(t["rows"] for t in tasks),
        "checksums_ok": all(len(set(t["checksums"])) == 1 for t in tasks),
        "checksum": sum(t["checksums"][0] for t in tasks),
        "peak_rss_mb": max(t["peak_rss_mb"] for t in tasks),
        "feed_rss_mb": max(t["peak_rss_mb"] - t["baseline_rss_mb"] for t in tasks),
        "partition_mb": max(t["rows"] for t in tasks) * variant.row_bytes / 2**20,
    }


def _warm_worker(batches):
    import torch  # noqa: F401

    import deepspark.data  # noqa: F401

    for batch in batches:
        yield pa.record_batch({"ok": pa.array([batch.num_rows], pa.int64())})


_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stdout, with the seconds since the benchmark started."""
    print(f"{time.perf_counter() - _STARTED:7.1f}s  {message}", flush=True)


def warm_up_spark(spark, source: str, target: str) -> None:
    """Load the classes both Spark paths use (Parquet scan and write, Arrow to Python) and
    start the Python workers with torch imported, as a warm session would have them."""
    sample = spark.read.parquet(source).limit(2000)
    sample.write.mode("overwrite").parquet(target)
    sample.mapInArrow(_warm_worker, "ok long").collect()
    shutil.rmtree(target, ignore_errors=True)


# --- the run --------------------------------------------------------------------------------


def run_variant(
    spark,
    variant: Variant,
    workdir: str,
    pool,
    epochs: int,
    repeats: int,
    *,
    warm_up: bool,
    quick: bool,
) -> dict:
    source = os.path.join(workdir, f"{variant.name}-source")
    started = time.perf_counter()
    write_source(variant, source)
    log(f"[{variant.name}] wrote {variant.rows:,} rows in {time.perf_counter() - started:.1f} s")
    if warm_up:
        warm_up_spark(spark, source, os.path.join(workdir, "warm-up"))
        log(f"[{variant.name}] Spark warmed up")
    a = limit(variant, source, repeats)
    log(f"[{variant.name}] (a) {a['rows_per_cpu_s']:,.0f} rows per CPU second")
    b = materialise_then_read(spark, variant, source, os.path.join(workdir, "materialised"), pool)
    log(f"[{variant.name}] (b) {b['total_s']:.1f} s")
    c = deepspark_tasks(spark, variant, source, epochs)
    log(f"[{variant.name}] (c) first epoch {c['first_epoch_s']:.1f} s")
    spark_read_s = None
    if not quick:
        # The floor under (b) and (c): Spark reading the source, rows produced, no output.
        started = time.perf_counter()
        spark.read.parquet(source).coalesce(2).write.format("noop").mode("overwrite").save()
        spark_read_s = time.perf_counter() - started
    expected = variant.rows * (variant.rows - 1) // 2
    assert a["checksum"] == b["checksum"] == c["checksum"] == expected, "rows went missing"
    assert c["checksums_ok"], "an epoch did not see every row exactly once"
    shutil.rmtree(source, ignore_errors=True)
    batch_mb = BATCH * variant.row_bytes / 2**20
    return {
        "rows": variant.rows,
        "limit_rows_per_s_per_core": a["rows_per_cpu_s"],
        "later_epoch_rows_per_s_per_core": c["later_rows_per_cpu_s"],
        "ratio_vs_limit": c["later_rows_per_cpu_s"] / a["rows_per_cpu_s"],
        "limit_rows_per_s_wall": a["rows_per_wall_s"],
        "later_epoch_rows_per_s_wall": c["later_rows_per_wall_s"],
        "ratio_vs_limit_wall": c["later_rows_per_wall_s"] / a["rows_per_wall_s"],
        "materialize_s": b["materialise_s"],
        "materialize_then_read_s": b["total_s"],
        "first_epoch_s": c["first_epoch_s"],
        "speedup_vs_materialize": b["total_s"] / c["first_epoch_s"],
        "peak_rss_mb": c["peak_rss_mb"],
        "feed_rss_mb": c["feed_rss_mb"],
        "partition_mb_per_task": c["partition_mb"],
        "rss_target_mb": 2 * batch_mb + 200,
        "spill_s": max(t["spill_s"] for t in c["tasks"]),
        "spark_read_s": spark_read_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="far fewer rows (< 2 minutes)")
    parser.add_argument("--rows", type=int, help="rows of the 64-feature data")
    parser.add_argument("--image-rows", type=int, help="rows of the 28x28 image data")
    parser.add_argument("--epochs", type=int, help="epochs per task (first + later)")
    parser.add_argument("--workdir", help="where the Parquet data and spills go")
    args = parser.parse_args()
    rows = args.rows or (100_000 if args.quick else 2_000_000)
    image_rows = args.image_rows or (10_000 if args.quick else 1_400_000)
    epochs = args.epochs or (2 if args.quick else 4)
    repeats = 1 if args.quick else 3
    workdir = tempfile.mkdtemp(prefix="deepspark-feed-bench-", dir=args.workdir)
    load_before = os.getloadavg()[0]

    import deepspark as ds

    context = multiprocessing.get_context("spawn")
    results = {}
    try:
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
            # (b)'s readers start before the clock, as its peers' workers would be; they
            # start while Spark does.
            readers = [pool.submit(_warm_up, index) for index in range(2)]
            # 4 GiB of heap: Spark's Parquet writer in (b) runs out of the default 1 GiB on
            # the images.
            spark = ds.init_context(cores=2, driver_memory="4g")
            spark.sparkContext.setLogLevel("ERROR")
            assert len({reader.result() for reader in readers}) == 2
            log("Spark and the reader processes started")
            variants = [
                Variant("features", "features", (FEATURES,), rows),
                Variant("image", "image", IMAGE_SHAPE, image_rows),
            ]
            for index, variant in enumerate(variants):
                results[variant.name] = run_variant(
                    spark,
                    variant,
                    workdir,
                    pool,
                    epochs,
                    repeats,
                    warm_up=index == 0,
                    quick=args.quick,
                )
    finally:
        ds.stop_context()
        shutil.rmtree(workdir, ignore_errors=True)
    log("done")

    load_after = os.getloadavg()[0]
    headers = [
        "variant",
        "rows",
        "(a) rows/s/core",
        "(c) later rows/s/core",
        "ratio",
        "ratio (wall)",
        "(b) mat+read s",
        "(c) 1st epoch s",
        "speedup",
        "peak RSS MB",
        "feed RSS MB",
        "partition MB",
    ]
    table = [
        [
            name,
            r["rows"],
            r["limit_rows_per_s_per_core"],
            r["later_epoch_rows_per_s_per_core"],
            r["ratio_vs_limit"],
            r["ratio_vs_limit_wall"],
            r["materialize_then_read_s"],
            r["first_epoch_s"],
            r["speedup_vs_materialize"],
            r["peak_rss_mb"],
            r["feed_rss_mb"],
            r["partition_mb_per_task"],
        ]
        for name, r in results.items()
    ]
    print()
    print_table(headers, table)
    main_result = results["features"]
    image = results["image"]
    summary = {
        "benchmark": "feed",
        "date": today(),
        "machine": machine(),
        "quick": args.quick,
        "load_average": [round(load_before, 1), round(load_after, 1)],
        "batch_size": BATCH,
        **{
            key: round(value, 4) if isinstance(value, float) else value
            for key, value in main_result.items()
        },
        "peak_rss_mb": round(max(main_result["peak_rss_mb"], image["peak_rss_mb"]), 1),
        "feed_rss_mb": round(max(main_result["feed_rss_mb"], image["feed_rss_mb"]), 1),
        "image": {
            key: round(value, 4) if isinstance(value, float) else value
            for key, value in image.items()
        },
        "targets": {
            "later_epoch_ge_0_8x_limit": min(main_result["ratio_vs_limit"], image["ratio_vs_limit"])
            >= 0.8,
            "first_epoch_ge_2x_faster": min(
                main_result["speedup_vs_materialize"], image["speedup_vs_materialize"]
            )
            >= 2.0,
            "feed_rss_under_target": image["feed_rss_mb"] < image["rss_target_mb"],
            "peak_rss_under_target": image["peak_rss_mb"] < image["rss_target_mb"],
            "partition_10x_target": image["partition_mb_per_task"] >= 10 * image["rss_target_mb"],
        },
    }
    emit_json(summary)


if __name__ == "__main__":
    run_logged("feed", main)
