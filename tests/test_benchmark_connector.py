"""The images benchmark's connector baseline is what it claims: one warm server process.

benchmarks/images.py compares deepspark against Spark tasks that send image bytes to a
long-lived inference server (benchmarks/connector_server.py). These tests run a small version
of that path, with a real server process and a real Spark job, and check that every request
of every job was answered by the same process, which loaded its model once.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from deepspark.context.spark_versions import collect_arrow

pytest.importorskip("PIL")


def _connector_module():
    """benchmarks/connector_server.py, loaded by its path: putting benchmarks/ on sys.path
    would let its keras.py shadow Keras for every later test of the run."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "connector_server.py"
    spec = importlib.util.spec_from_file_location("connector_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_connector = _connector_module()
ServerProcess, client_fn = _connector.ServerProcess, _connector.client_fn


def _connector_frame(spark, folder: str, url: str):
    """The benchmark's connector path: Spark reads the files, its tasks call the server."""
    import pyarrow as pa
    from pyspark.sql.pandas.types import from_arrow_schema

    files = spark.read.format("binaryFile").load(folder).select("path", "content").repartition(2)
    # The answer's schema, from one request made here on the driver.
    first = collect_arrow(files.limit(1)).to_batches()
    answered = pa.Table.from_batches(list(client_fn(url)(iter(first))))
    return files.mapInArrow(client_fn(url, rows_per_request=2), from_arrow_schema(answered.schema))


@pytest.mark.slow  # a server process of its own, and a model scored in Spark jobs
def test_connector_server_answers_every_job_from_one_warm_process(spark, tmp_path):
    from deepspark.vision.samples import write_near_duplicates

    folder = str(tmp_path / "images")
    count = len(write_near_duplicates(folder, count=6, seed=3, long_side=160))
    with ServerProcess("embed", "torch", threads=1) as server:
        before = server.stats()
        assert before["model_loads"] == 1, "the server loads its model before the first request"
        assert before["pid"] != os.getpid()
        frame = _connector_frame(spark, folder, server.url)
        first_job = frame.collect()
        after_first = server.stats()
        second_job = frame.collect()
        after_second = server.stats()

    for rows in (first_job, second_job):
        assert len(rows) == count
        assert all(row.error is None for row in rows)
        assert {len(row.features) for row in rows} == {1280}
    by_path = {row.path: np.array(row.features) for row in first_job}
    for row in second_job:  # the same process, the same model: the same features
        np.testing.assert_allclose(np.array(row.features), by_path[row.path], rtol=1e-5)
    assert after_first["pid"] == after_second["pid"] == before["pid"]
    assert after_first["model_loads"] == after_second["model_loads"] == 1
    # 1 request from the driver for the schema, then 6 images in requests of 2 per job.
    assert after_first["requests"] >= before["requests"] + 1 + count // 2
    assert after_second["requests"] >= after_first["requests"] + count // 2
    assert after_second["batches"] <= after_second["requests"]


def test_connector_server_refuses_an_unknown_section():
    with pytest.raises(ValueError, match="section='classify'"):
        ServerProcess("classify", "torch", threads=1)


def test_an_answer_of_no_rows_still_gives_the_answer_schema():
    # a detect request whose images hold no object answers a table of no rows; the client
    # still yields its schema (the benchmark reads the job's schema from one such answer)
    import http.server
    import threading

    import pyarrow as pa

    schema = pa.schema([("path", pa.string()), ("label", pa.string()), ("score", pa.float32())])

    class Empty(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, schema):
                pass
            body = sink.getvalue().to_pybytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Empty)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        request = pa.RecordBatch.from_pydict({"path": ["a.jpg"], "content": [b"not an image"]})
        url = f"http://127.0.0.1:{server.server_address[1]}"
        answered = list(client_fn(url)(iter([request])))
    finally:
        server.shutdown()
        thread.join(10)
    assert [batch.num_rows for batch in answered] == [0]
    assert answered[0].schema == schema
