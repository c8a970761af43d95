"""bench/prepare_tokenize.py (issue #16's throughput against the seed recipe) kept runnable:
it drives the prepare and tokenize stages' own code, so a change to their interfaces must
not leave it broken until someone next runs the benchmark."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import prepare_tokenize  # noqa: E402


def test_the_benchmark_runs_the_stages_beside_the_seed_and_reports_the_pad_share(tmp_path, model_cache):
    (recipe, sets), *_ = prepare_tokenize.cases(REPO.parent / "shared" / "data")
    r = prepare_tokenize.bench(recipe, [*sets, "model.name=tiny-gpt2"], 1, tmp_path / "data", limit=300)
    assert r["recipe"] == "descramble" and r["rows"] > 300  # 300 paragraphs, cut into sentences
    assert r["seed_rows_per_s"] > 0 and r["ours_rows_per_s"] > 0
    assert r["ours_prepare_s"] > 0 and r["ours_tokenize_s"] > 0  # where our time goes
    # the seed pads every row to 128 tokens; best-fit packing into 512 leaves little room
    assert r["ours_pad_share"] < 0.1 < r["seed_pad_share"]
    assert 1 < r["ours_examples_per_sequence"] and r["ours_tokens_per_sequence"] <= 512
