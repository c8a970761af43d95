"""bench/gpu_check.sh, the GPU check of issue #18, kept working on the CPU with tiny models:
its scratch-training row runs the real stages; its pipeline rows read a finished run."""

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow


def test_the_scratch_row_trains_through_the_stages_and_reports_throughput_and_mfu(tmp_path, model_cache):
    row = gpu_check.scratch_row(tmp_path, tiny=True)
    assert row["steps"] == 3 and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    # Run in its own project: nothing of the repository's own is written.
    params = (tmp_path / "scratch" / "params.yaml").read_text()
    assert "gpt2-scratch-tiny" in params and "max_length: 64" in params and "concat" in params
    # `--rows scratch` (a device call without SmolLM2): the table has that row alone.
    text = gpu_check.table({"scratch": row, "scratch_model": "gpt2-scratch-tiny", "scratch_T": 64})
    assert text.count("\n") == 3 and "gpt2-scratch-tiny full, concat T=64" in text and "default job" not in text


def test_the_table_reports_the_default_jobs_training_and_end_to_end_figures(built, tmp_path):
    train = gpu_check.train_figures(built.root)
    e2e = gpu_check.end_to_end_figures(built.root, built.flow_out, 123.0)
    assert train["steps"] == 6 and train["tokens_per_s"] > 0
    assert e2e["metric"] == "perplexity" and e2e["tuned"] < e2e["base"]
    assert list(e2e["stage_s"]) == ["prepare", "tokenize", "train", "validate", "evaluate", "register"]
    res = {"scratch": train, "default_train": train, "default_end_to_end": e2e, "scratch_model": "m", "scratch_T": 64}
    text = gpu_check.table(res)
    assert "default job end to end" in text and "123 s" in text and f"{train['tokens_per_s']:,.0f}" in text
    assert f"best val loss {train['best_val_loss']:.4f}" in text and "QLoRA" not in text
    res["qlora"] = train | e2e | {"parity": "[register] merge parity ..."}  # what a CUDA run adds
    assert "default job, QLoRA nf4" in gpu_check.table(res).splitlines()[-1]
    json.dumps(res)  # what --out writes
