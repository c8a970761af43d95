"""The benchmarks in bench/ kept runnable. They drive the stages' own code, so a change to
an interface they use (a new keyword, a new return shape) must fail here, not wait for
the next person who runs a benchmark. Each runs at a tiny size; the figures come from the
full runs, never from these."""

import argparse
import importlib

import pytest
from conftest import REPO

SHARED = REPO.parent / "shared" / "data"


@pytest.fixture
def bench(monkeypatch):
    """Import a bench module. Some set TUNELINE_ROOT for their own process on import: it is
    set here first, and undone after, so later tests' subprocesses find their own root."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setenv("TUNELINE_ROOT", str(REPO))
    return importlib.import_module


def test_prepare_tokenize_runs_the_stages_beside_the_seed_and_reports_the_pad_share(bench, tmp_path, model_cache):
    prepare_tokenize = bench("prepare_tokenize")
    (recipe, sets), *_ = prepare_tokenize.cases(SHARED)
    r = prepare_tokenize.bench(recipe, [*sets, "model.name=tiny-gpt2"], 1, tmp_path / "data", limit=300)
    assert r["recipe"] == "descramble" and r["rows"] > 300  # 300 paragraphs, cut into sentences
    assert r["seed_rows_per_s"] > 0 and r["ours_rows_per_s"] > 0
    assert r["ours_prepare_s"] > 0 and r["ours_tokenize_s"] > 0  # where our time goes
    # the seed pads every row to 128 tokens; best-fit packing into 512 leaves little room
    assert r["ours_pad_share"] < 0.1 < r["seed_pad_share"]
    assert r["ours_examples_per_sequence"] > 1  # several sentences share each packed row


def test_generate_batched_gives_the_one_at_a_time_answers(bench, model_cache):
    args = argparse.Namespace(model="tiny-gpt2", n=6, batch_size=4, precision="fp32", lookup=0, repeats=1)
    r = bench("generate_batched").bench(args)
    assert r["prompts"] == 6 and r["outputs_identical"] == 6 and r["token_ids_identical"] == 6
    assert r["goals"]["identical"] and r["ratio"] > 0


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data (the emotion tweets)")
def test_label_scoring_picks_the_same_labels_from_one_encoding_per_prompt(bench, model_cache):
    r = bench("label_scoring").bench(argparse.Namespace(model="tiny-gpt2", n=6))
    assert r["rows"] == 6 and r["labels"] == 6 and r["picks_identical"] == 6
    assert r["max_abs_logprob_diff"] < 1e-3
    assert r["cached_tokens"] < r["pair_tokens"]  # each prompt once, not once per label
