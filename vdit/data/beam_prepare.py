"""`vdit prepare` on Apache Beam (`runner="beam"`): the same per-file work (`prepare.process`) as a
Beam pipeline, so one command runs in process, with local worker processes, or on a cluster.

    jobs --Create--> Reshuffle (spread files over workers) --ParDo(process, write part)--> done

Each worker runs `prepare.process` on one file at a time and writes what it made as a part in
`OUT/.parts/`: `NNNNNNNN.array_record` (the file's kept records, in clip order) and
`NNNNNNNN.json` (the rest of the result: scores, drops, events, thumbnails; written last, so a
part is complete once its JSON exists). The pipeline holds no records: a worker holds one
file's clips at a time, whatever the dataset's size (a file is decoded whole: `max_frames` caps
very long ones). When the pipeline is done, the caller's
ordered writer (`prepare._write`) reads the parts back in job order, one at a time, writes the
shards and manifest as the local runner does, and removes the parts: the output depends neither
on the runner nor on the number of workers.

Runner choice: `workers=0` is Beam's DirectRunner in process ("in_memory"); `workers=N` is the
DirectRunner with N `multi_processing` workers; `beam_options` passes Beam's own pipeline options
(e.g. `--runner=FlinkRunner --flink_master=HOST:8081`, `--runner=DataflowRunner --project=P
--region=R --temp_location=gs://...`), used as given. On a cluster, the input files and the output
folder must be on a filesystem every worker and the launching host see (a shared mount). Needs
the `data` extra.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
from collections.abc import Iterator
from typing import Any

from vdit.data import records

PARTS = ".parts"


def require():
    try:
        import apache_beam
    except ImportError as e:
        raise ImportError(
            f"runner='beam' needs Apache Beam ({e}); install the data extra: "
            'pip install -e ".[data]"'
        ) from None
    return apache_beam


def _part(parts_dir: str, index: int, suffix: str) -> str:
    return os.path.join(parts_dir, f"{index:08d}{suffix}")


def write_part(parts_dir: str, result: dict[str, Any]) -> None:
    """One file's result -> its part (records, then the JSON that completes it)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    index = result["index"]
    meta = {**result, "clips": []}
    kept = [c for c in result["clips"] if "record" in c]
    if kept:
        writer = ArrayRecordWriter(_part(parts_dir, index, records.SHARD_SUFFIX), "group_size:1")
        for c in kept:
            writer.write(c["record"])
        writer.close()
    for c in result["clips"]:
        c = {k: v for k, v in c.items() if k != "record"}
        c["thumb"] = base64.b64encode(c["thumb"]).decode("ascii")
        c["has_record"] = any(c["clip"] == k["clip"] for k in kept)
        meta["clips"].append(c)
    tmp = _part(parts_dir, index, ".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(tmp, _part(parts_dir, index, ".json"))


def read_part(parts_dir: str, index: int) -> dict[str, Any]:
    """A part -> the result `prepare.process` returned for that file (records included)."""
    from array_record.python.array_record_module import ArrayRecordReader

    with open(_part(parts_dir, index, ".json"), encoding="utf-8") as f:
        result = json.load(f)
    path = _part(parts_dir, index, records.SHARD_SUFFIX)
    data = []
    if os.path.exists(path):
        reader = ArrayRecordReader(path)
        data = reader.read_all()
        reader.close()
    it = iter(data)
    for c in result["clips"]:
        c["thumb"] = base64.b64decode(c["thumb"])
        if c.pop("has_record"):
            c["record"] = next(it)
    return result


class _Process:
    """The Beam DoFn: `prepare.process` on one job, its part written; emits the job index."""

    def __init__(self, options, parts_dir: str):
        self.options, self.parts_dir = options, parts_dir

    def __call__(self, job):
        from vdit.data import prepare

        write_part(self.parts_dir, prepare.process(job, self.options))
        yield job.index


def pipeline_args(options) -> list[str]:
    """Beam pipeline options: `beam_options` as given, else the DirectRunner for `workers`."""
    args = shlex.split(options.beam_options)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
        if options.workers > 0:
            args += [
                f"--direct_num_workers={options.workers}",
                "--direct_running_mode=multi_processing",
            ]
        else:
            args += ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
    return args


def run(jobs: list, options, out_dir: str) -> Iterator[dict[str, Any]]:
    """Runs the pipeline over `jobs`, then yields each file's result in job order (read back from
    its part, one at a time) and removes the parts."""
    beam = require()
    from apache_beam.options.pipeline_options import PipelineOptions

    parts_dir = os.path.join(out_dir, PARTS)
    if os.path.exists(parts_dir):
        shutil.rmtree(parts_dir)  # left by a run that stopped (no manifest was written)
    os.makedirs(parts_dir)
    if jobs:
        with beam.Pipeline(options=PipelineOptions(pipeline_args(options))) as p:
            _ = (
                p
                | "files" >> beam.Create(jobs)
                | "spread" >> beam.Reshuffle()
                | "process" >> beam.FlatMap(_Process(options, parts_dir))
            )
    missing = [j.rel for j in jobs if not os.path.exists(_part(parts_dir, j.index, ".json"))]
    if missing:
        raise RuntimeError(f"the pipeline finished without results for {missing[:3]}")
    for job in jobs:
        yield read_part(parts_dir, job.index)
    shutil.rmtree(parts_dir)
