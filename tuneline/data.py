"""Where every stage's outputs live, and how the next stage reads them.

The one place that spells an output path: the stages write here, later stages, the flow
and the resume code read here, and `tuneline dvc-deps` writes these paths into dvc.yaml's
`outs` and `metrics` (a test fails when they disagree). Paths are relative to the project
root (the stages run there; smoke runs in their own folder).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tuneline.errors import TunelineError
from tuneline.io import read_parquet

SPLITS = ("train", "val", "test")

PREPARED = Path("data/prepared")  # {train,val,test}.parquet with the task's columns, lineage.json
LINEAGE = PREPARED / "lineage.json"
TOKENIZED = Path("data/tokenized")  # per split: a flat token stream or packed Arrow rows, meta.json (tokendata.py)
TOKENIZED_META = TOKENIZED / "meta.json"
MODELS = Path("models")  # adapter/ (LoRA) and merged/ (a plain HF model + tokenizer)
MERGED = MODELS / "merged"
BASE_META = MODELS / "base.json"  # which base model train started from: {model, identity} (modeling.identity)
CHECKPOINTS = Path("checkpoints/train")  # resume state (not a DVC output: it outlives a failed run)
WRITTEN = (PREPARED, TOKENIZED, MODELS, CHECKPOINTS)  # folders the stages replace: never a run's input
TRAIN_CURVE = Path("plots/train.csv")
PREDICTIONS = Path("reports/predictions.jsonl")
EVAL_EXAMPLES = Path("reports/eval_examples.json")
VAL_EXAMPLES = Path(
    "reports/val_examples.json"
)  # the tuned model's per-example records on val (sweeps compare arms on them)


# What `dvc metrics show` lists: one file per stage.
METRICS = {
    "prepare": Path("metrics/prepare.json"),
    "tokenize": Path("metrics/tokenize.json"),
    "train": Path("metrics/train.json"),
    "validate": Path("metrics/validate.json"),
    "evaluate": Path("metrics/eval.json"),
    "register": Path("metrics/register.json"),
}
UNCACHED = {TRAIN_CURVE, PREDICTIONS, EVAL_EXAMPLES, VAL_EXAMPLES}  # small files kept in git, not in DVC's cache


def metrics_file(stage: str) -> Path:
    return METRICS[stage]


def read_split(split: str, root: Path = PREPARED) -> list[dict]:
    """Prepared rows of one split: {column: text}."""
    return read_parquet(root / f"{split}.parquet", "prepare")


def iter_split(split: str, batch_rows: int, root: Path = PREPARED) -> tuple[int, Iterator[list[dict]]]:
    """(rows, batches of rows) of one prepared split, read batch by batch."""
    import pyarrow.parquet as pq

    path = root / f"{split}.parquet"
    if not path.is_file():
        raise TunelineError(f"{path} is missing", "run the prepare stage first (dvc repro prepare)")
    f = pq.ParquetFile(path)
    # One row group at a time (prepare bounds their size): `iter_batches` kept every decoded
    # batch's buffers in Arrow's pool, so its memory grew with the file.
    batches = (
        b.to_pylist() for g in range(f.num_row_groups) for b in f.read_row_group(g).to_batches(max_chunksize=batch_rows)
    )
    return f.metadata.num_rows, batches


def trained_model() -> str:
    """The model this pipeline trained, where the stage runs (the project, a smoke run's
    .smoke/<recipe>/, a sweep arm's copy), as the loaders should be given it: absolute,
    since they look a relative name up in the project first (tuneline.located), as they
    must for a user's model folder. Given "models/merged", a smoke run in a project that
    had trained scored and logged the project's model, not its own."""
    return str(MERGED.absolute())
