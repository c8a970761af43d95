"""prepare: stream the source, validate it, clean it, split it, write Parquet.

Writes data/prepared/{train,val,test}.parquet with the task's columns and
data/prepared/lineage.json (where the data came from: hub revision or file hashes).
The splitting rules are in tuneline/splits.py, the near-duplicate audit of train against
val/test in tuneline/neardup.py; memory does not grow with the source.
"""

from __future__ import annotations

from tuneline import splits, tasks
from tuneline.config import Params
from tuneline.data import PREPARED, SPLITS, metrics_file
from tuneline.io import atomic_dir, write_json
from tuneline.tracking import log_metrics, log_table

PARAMS = (
    "seed",
    "prepare.task",
    "prepare.source",
    "prepare.test_source",
    "prepare.columns",
    "prepare.labels",
    "prepare.hub_streaming",
    "prepare.bad_rows",
    "prepare.on_overlap",
    "prepare.near_dup_threshold",
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
    log_metrics(metrics, prefix="prepare_")
    if metrics.get("near_duplicate_pairs"):  # the reviewer reads the top pairs in the MLflow UI
        pairs = metrics["near_duplicate_pairs"]
        log_table({k: [p[k] for p in pairs] for k in pairs[0]}, "near_duplicates.json")
    print(
        f"[prepare] {task.name}: "
        + ", ".join(f"{n} {metrics[f'{n}_rows']}" for n in SPLITS)
        + f" rows ({metrics['duplicates_removed']} duplicates removed)",
        flush=True,
    )
    return metrics
