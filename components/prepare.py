"""prepare: stream the source, validate it, clean it, split it, write Parquet.

Writes data/prepared/{train,val,test}.parquet with the task's columns and
data/prepared/lineage.json (where the data came from: hub revision or file hashes).
The splitting rules are in tuneline/splits.py; memory does not grow with the source.
"""

from __future__ import annotations

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
    "prepare.hub_streaming",
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
    task = tasks.TASKS[params.prepare.task]
    with atomic_dir(PREPARED) as tmp:
        metrics = splits.write_splits(params, tmp)
        write_json(tmp / "lineage.json", metrics.pop("lineage"))
    write_json(metrics_file("prepare"), metrics)
    print(
        f"[prepare] {task.name}: "
        + ", ".join(f"{n} {metrics[f'{n}_rows']}" for n in SPLITS)
        + f" rows ({metrics['duplicates_removed']} duplicates removed)",
        flush=True,
    )
    return metrics
