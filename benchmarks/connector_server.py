"""The images benchmark's connector: a long-lived inference server that Spark tasks call.

This is the case the connector stands for: images shipped from Spark to a separate, already
running inference service. The server is one Python process on loopback (stdlib
``http.server``); it loads its models once at start-up, then serves:

* ``POST /infer``: the body is an Arrow IPC stream of rows (``path``, ``content``: the image
  bytes); the answer is an Arrow IPC stream of the same worker code's output rows (embed: one
  row per image; detect: one row per box). Requests that arrive together are batched: one
  thread takes every queued request, up to ``--max-batch`` images, and runs them as one batch
  with all the process's cores, as model servers' dynamic batching does (TorchServe's
  ``batch_size``/``max_batch_delay``, Triton's dynamic batcher);
* ``GET /stats``: ``pid``, ``model_loads`` (the loads of the process's model cache),
  ``requests``, ``batches`` and ``load_s``, so that a test and the benchmark can show that
  every request was answered by the same warm process.

Spark's side is :func:`client_fn`, a ``mapInArrow`` function that sends each Arrow batch of the
task to the server and yields the answer. :class:`ServerProcess` starts and stops the server.

Usage (normally started by images.py or a test)::

    python benchmarks/connector_server.py --section embed --runtime onnx --threads 2 \
        --port-file /tmp/port
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

REQUEST_COLUMN = "__request"  # which request a row came from, so a batch's rows go back
SECTIONS = ("embed", "detect")


def _detector_runtime(runtime: str) -> str:
    """The detector runs int8 with an int8 embedder, else OpenCV (images.py's rule)."""
    return "onnx-int8" if runtime == "onnx-int8" else "opencv"


@dataclass
class _Pending:
    batch: pa.RecordBatch
    done: threading.Event = field(default_factory=threading.Event)
    result: pa.Table | None = None
    error: BaseException | None = None


class Batcher:
    """One inference thread that runs every waiting request together, in arrival order."""

    def __init__(self, run: Callable[[pa.RecordBatch], pa.Table], max_batch: int) -> None:
        self._run, self._max_batch = run, max_batch
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._serve, daemon=True, name="batcher").start()

    def infer(self, batch: pa.RecordBatch) -> pa.Table:
        pending = _Pending(batch)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _serve(self) -> None:
        while True:
            taken = [self._queue.get()]
            rows = taken[0].batch.num_rows
            while rows < self._max_batch:
                try:
                    extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken.append(extra)
                rows += extra.batch.num_rows
            self._run_together(taken)

    def _run_together(self, taken: list[_Pending]) -> None:
        tagged = [
            item.batch.append_column(
                REQUEST_COLUMN, pa.array([index] * item.batch.num_rows, pa.int32())
            )
            for index, item in enumerate(taken)
        ]
        try:
            output = self._run(pa.Table.from_batches(tagged).combine_chunks().to_batches()[0])
            self.batches += 1
            tags = output.column(REQUEST_COLUMN).to_numpy()
            output = output.drop_columns([REQUEST_COLUMN])
            for index, item in enumerate(taken):
                item.result = output.filter(pa.array(tags == index))
        except BaseException as err:  # the caller's request fails with it, the server lives on
            for item in taken:
                item.error = err
        for item in taken:
            item.done.set()


def load_worker(section: str, runtime: str, threads: int) -> Callable[[pa.RecordBatch], pa.Table]:
    """The models loaded now, once; a function running deepspark's worker code on one batch."""
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

    columns = ImageColumns("content", None, ("path", REQUEST_COLUMN))
    if section == "detect":
        embed = EmbedSpec(default_embedder(runtime), columns, resize="stretch", num_threads=threads)
        spec = DetectSpec(
            columns,
            files=yolov3_tiny_files(),
            with_crops=False,
            num_threads=threads,
            embed=embed,
            runtime=_detector_runtime(runtime),
        )
        load_detector(spec)
        load_model(embed.model, num_threads=threads)

        def run(batch: pa.RecordBatch) -> pa.Table:
            return _as_table(detect_partition([batch], spec), batch)

        return run
    spec = EmbedSpec(default_embedder(runtime), columns, num_threads=threads)
    load_model(spec.model, num_threads=threads)

    def run_embed(batch: pa.RecordBatch) -> pa.Table:
        return _as_table(embed_partition([batch], spec), batch)

    return run_embed


def _as_table(batches: Iterator[pa.RecordBatch], source: pa.RecordBatch) -> pa.Table:
    collected = list(batches)
    if collected:
        return pa.Table.from_batches(collected)
    # Detect yields nothing when no image has a box: an empty table that still has the tag.
    return pa.table({REQUEST_COLUMN: pa.array([], pa.int32())})


def _model_loads() -> int:
    """Model loads in this process so far: deepspark's per-process model cache counts each
    (the embedder; the detector is built once by ``load_detector``'s own per-process cache)."""
    from deepspark.inference import cache_info

    return cache_info().loads


def serve(section: str, runtime: str, threads: int, max_batch: int, port_file: str) -> None:
    """Load the models, then answer requests until killed."""
    started = time.perf_counter()
    run = load_worker(section, runtime, threads)
    load_s = time.perf_counter() - started
    batcher = Batcher(run, max_batch)
    counters = {"requests": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a task reuses one connection

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                counters["requests"] += 1
            try:
                table = pa.ipc.open_stream(body).read_all()
                batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
                result = batcher.infer(batch) if batch is not None else pa.table({})
            except Exception as err:
                self._answer(500, repr(err).encode(), "text/plain")
                return
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, result.schema) as writer:
                writer.write_table(result)
            self._answer(200, sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream")

        def do_GET(self) -> None:
            stats = {
                "pid": os.getpid(),
                "model_loads": _model_loads(),
                "requests": counters["requests"],
                "batches": batcher.batches,
                "load_s": load_s,
            }
            self._answer(200, json.dumps(stats).encode(), "application/json")

        def _answer(self, status: int, payload: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:  # quiet: one line per request is noise
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as handle:
        handle.write(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)  # the port appears only once the server listens
    server.serve_forever()


class ServerProcess:
    """The server as a child process: started (models loaded) on enter, killed on exit."""

    def __init__(
        self, section: str, runtime: str, threads: int, max_batch: int = 64, timeout_s: float = 600
    ) -> None:
        if section not in SECTIONS:
            raise ValueError(f"section={section!r}: use one of {', '.join(SECTIONS)}")
        self.args = [section, runtime, str(threads), str(max_batch)]
        self.timeout_s = timeout_s
        self.url = ""
        self.start_s = 0.0
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        section, runtime, threads, max_batch = self.args
        folder = tempfile.mkdtemp(prefix="connector-server-")
        port_file = os.path.join(folder, "port")
        log = open(os.path.join(folder, "server.log"), "w")
        started = time.perf_counter()
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--section", section, "--runtime",
             runtime, "--threads", threads, "--max-batch", max_batch, "--port-file", port_file],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(port_file):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                with open(log.name) as handle:
                    raise RuntimeError(f"connector server did not start:\n{handle.read()[-3000:]}")
            time.sleep(0.05)
        with open(port_file) as handle:
            self.url = f"http://127.0.0.1:{handle.read().strip()}"
        self.start_s = time.perf_counter() - started
        return self

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats", timeout=30) as answer:
            return json.loads(answer.read())

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=30)


def client_fn(url: str, rows_per_request: int = 32) -> Callable:
    """A ``mapInArrow`` function: each task sends its rows (``path``, ``content``) to the
    server in requests of ``rows_per_request`` images over one keep-alive connection, and
    yields the answers."""

    def send(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import http.client
        import urllib.parse

        address = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
        try:
            for whole in batches:
                for start in range(0, whole.num_rows, rows_per_request):
                    part = whole.slice(start, rows_per_request).select(["path", "content"])
                    sink = pa.BufferOutputStream()
                    with pa.ipc.new_stream(sink, part.schema) as writer:
                        writer.write_batch(part)
                    connection.request("POST", "/infer", body=sink.getvalue().to_pybytes())
                    answer = connection.getresponse()
                    payload = answer.read()
                    if answer.status != 200:
                        raise RuntimeError(f"connector server: {payload.decode()[-2000:]}")
                    table = pa.ipc.open_stream(payload).read_all()
                    # an answer of no rows (no detection in these images) still has its schema
                    empty = pa.RecordBatch.from_pylist([], schema=table.schema)
                    yield from table.to_batches() or [empty]
        finally:
            connection.close()

    return send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=SECTIONS, required=True)
    parser.add_argument("--runtime", required=True, help="torch, onnx or onnx-int8")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    serve(args.section, args.runtime, args.threads, args.max_batch, args.port_file)


if __name__ == "__main__":
    main()
