"""prepare: load the source, validate it, clean it, split it, write Parquet.

Writes data/prepared/{train,val,test}.parquet with the task's columns and
data/prepared/lineage.json (where the data came from: hub revision or file hashes).
The splitting rules are in tuneline/splits.py.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tuneline import splits, tasks
from tuneline.config import Params
from tuneline.data import PREPARED, SPLITS, metrics_file
from tuneline.io import atomic_dir, write_json

PARAMS = (
    "seed",
    "prepare.task",
    "prepare.source",
    "prepare.test_source",
    "prepare.columns",
    "prepare.labels",
    "prepare.on_overlap",
    "prepare.min_words",
    "prepare.max_words",
    "prepare.n_train",
    "prepare.n_val",
    "prepare.n_test",
)
INPUTS = ()  # the sources named in params; tuneline run re-checks their hashes (flows/pipeline.py)
OUTS = (PREPARED,)


def run(params: Params) -> dict:
    split, metrics = splits.split_rows(params)
    lineage = metrics.pop("lineage")
    task = tasks.TASKS[params.prepare.task]
    with atomic_dir(PREPARED) as tmp:
        for name in SPLITS:
            rows = split[name]
            pq.write_table(pa.table({c: [r[c] for r in rows] for c in task.columns}), tmp / f"{name}.parquet")
            metrics[f"{name}_rows"] = len(rows)
            metrics[f"{name}_mean_words"] = sum(len(task.answer(r).split()) for r in rows) / len(rows)
        write_json(tmp / "lineage.json", lineage)
    write_json(metrics_file("prepare"), metrics)
    print(
        f"[prepare] {task.name}: "
        + ", ".join(f"{n} {metrics[f'{n}_rows']}" for n in SPLITS)
        + f" rows ({metrics['duplicates_removed']} duplicates removed)",
        flush=True,
    )
    return metrics
