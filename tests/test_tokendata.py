"""Token data at corpus scale: the streamed tokenize stage gives exactly the packed rows of
the in-memory code it replaced, does not depend on batching, and its memory stays flat."""

import bisect
import tracemalloc

import numpy as np
import pytest

from components import tokenize
from tuneline import recipes, sources, splits, tasks, tokendata
from tuneline.config import TokenizeCfg
from tuneline.modeling import load_tokenizer
from tuneline.packing import IGNORE
from tuneline.tokendata import read_rows
from tuneline.tokenization import encode_rows

# --- the in-memory packing tokenize used before token data streamed (commit 39cceae),
# kept verbatim as the reference the streamed stage must reproduce row for row ---------


def _old_bfd(lengths, capacity):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free, bins = [], []
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def _old_rows(examples, cfg):
    if cfg.packing != "concat":
        over = [e for e in examples if len(e.input_ids) > cfg.max_length]
        if over and cfg.overlong == "drop":
            examples = [e for e in examples if len(e.input_ids) <= cfg.max_length]
        elif over:
            examples = [type(e)(e.input_ids[: cfg.max_length], e.labels[: cfg.max_length]) for e in examples]
    if cfg.packing == "concat":
        ids = [t for e in examples for t in e.input_ids]
        labels = [t for e in examples for t in e.labels]
        n, T = len(ids) // cfg.max_length * cfg.max_length, cfg.max_length
        return [{"input_ids": ids[i : i + T], "labels": labels[i : i + T], "seq_lens": [T]} for i in range(0, n, T)]
    groups = _old_bfd([len(e.input_ids) for e in examples], cfg.max_length) if cfg.packing == "bfd" else None
    rows = []
    for g in groups or [[i] for i in range(len(examples))]:
        row = {"input_ids": [], "labels": [], "seq_lens": []}
        for i in g:
            row["input_ids"] += examples[i].input_ids
            row["labels"] += examples[i].labels
            row["seq_lens"].append(len(examples[i].input_ids))
        rows.append(row)
    return rows, examples


def _old_stats(rows, lengths, seed_pad_to=128):
    tokens = sum(len(r["input_ids"]) for r in rows)
    trainable = sum(sum(1 for x in r["labels"] if x != IGNORE) for r in rows)
    T = max(len(r["input_ids"]) for r in rows)
    return {
        "examples": len(lengths),
        "sequences": len(rows),
        "tokens": tokens,
        "pad_share": 1 - tokens / (len(rows) * T),
        "pad_share_seed_pad128": 1 - sum(lengths) / sum(max(seed_pad_to, n) for n in lengths),
        "tokens_per_sequence": tokens / len(rows),
        "examples_per_sequence": len(lengths) / len(rows),
        "trainable_token_share": trainable / tokens,
    }


def _plain(rows):
    return [{k: [int(x) for x in r[k]] for k in ("input_ids", "labels", "seq_lens")} for r in rows]


def _write_prepared(root, rows, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data/prepared").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), root / f"data/prepared/{split}.parquet")


@pytest.mark.parametrize("recipe", recipes.names())
def test_packed_rows_equal_the_in_memory_code_on_each_recipes_smoke_slice(recipe, tmp_path, monkeypatch, model_cache):
    params = recipes.build(recipe, smoke=True)
    task = tasks.TASKS[params.prepare.task]
    monkeypatch.setattr(sources, "BATCH_ROWS", 64)  # read only the head of the source
    rows, _ = splits.file_rows(params.prepare.source, params, limit=params.prepare.n_train)
    monkeypatch.chdir(tmp_path)
    _write_prepared(tmp_path, rows, task.columns)
    metrics = tokenize.run(params)["train"]
    tok = load_tokenizer(params.model.name)
    examples = encode_rows(tok, rows, task, params.prepare.labels)
    want = _old_rows(examples, params.tokenize)
    want, kept = (want, examples) if params.tokenize.packing == "concat" else want
    got = read_rows("train", tmp_path / "data/tokenized")
    assert len(want) > 1 and _plain(got[:]) == _plain(want)
    assert _old_stats(want, [len(e.input_ids) for e in kept]).items() <= metrics.items()


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while my dog ran far from our old red barn".split()
    return [{"text": " ".join(rng.choice(words, rng.integers(3, 40)))} for _ in range(n)]


def _write(root, tok, rows, batch, **cfg):
    root.mkdir(parents=True, exist_ok=True)
    cfg = TokenizeCfg(**cfg)
    batches = (rows[i : i + batch] for i in range(0, len(rows), batch))
    return tokendata.write_split(tok, batches, len(rows), tasks.TASKS["pretrain"], [], cfg, root, "train")


@pytest.mark.parametrize("packing", ["concat", "bfd", "none"])
def test_token_files_do_not_depend_on_the_batch_size(packing, tmp_path, gpt2_tok):
    rows = _rows(700)
    outs = []
    for batch in (700, 64, 7):
        root = tmp_path / f"b{batch}"
        stats, meta = _write(root, gpt2_tok, rows, batch, max_length=64, packing=packing)
        outs.append((stats, meta, {p.name: p.read_bytes() for p in sorted(root.iterdir())}))
    assert outs[0] == outs[1] == outs[2]
    assert not [p for p in outs[0][2] if p.startswith(".")]  # the examples spool is gone


def test_concat_blocks_mask_prompts_across_block_edges(tmp_path, gpt2_tok):
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} " * 9} for w in ("yes", "no", "maybe") * 5]
    root = tmp_path / "t"
    root.mkdir()
    cfg = TokenizeCfg(max_length=16, packing="concat")
    stats, meta = tokendata.write_split(gpt2_tok, [rows], len(rows), tasks.TASKS["instruct"], [], cfg, root, "val")
    (tmp_path / "t/meta.json").write_text(__import__("json").dumps({"max_length": 16, "splits": {"val": meta}}))
    examples = encode_rows(gpt2_tok, rows, tasks.TASKS["instruct"], [])
    want = _old_rows(examples, cfg)
    got = read_rows("val", root)
    assert _plain(got[:]) == _plain(want) and meta["dtype"] == "uint16"
    trained = sum(x != IGNORE for r in want for x in r["labels"])
    assert stats["trainable_token_share"] == trained / (len(want) * 16)


def test_overlong_examples_are_counted_never_silently_cut(tmp_path, gpt2_tok, capsys):
    rows = [{"text": "short text here"}, {"text": "word " * 40}, {"text": "another short one"}]
    stats, meta = _write(tmp_path / "d", gpt2_tok, rows, 2, max_length=16, packing="none", overlong="drop")
    assert stats["overlong_examples"] == 1 and meta["examples"] == 2
    assert "1 of 3 train examples are longer than tokenize.max_length=16: dropped" in capsys.readouterr().out
    stats, meta = _write(tmp_path / "t", gpt2_tok, rows, 2, max_length=16, packing="none", overlong="truncate")
    assert stats["truncated_examples"] == 1 and meta["examples"] == 3 and meta["tokens"] <= 3 * 16
    with pytest.raises(Exception, match="1 of 3 train examples are longer than tokenize.max_length=16"):
        _write(tmp_path / "e", gpt2_tok, rows, 2, max_length=16, packing="none", overlong="error")


def test_a_row_truncated_to_no_trained_token_is_dropped_and_counted(tmp_path, gpt2_tok, capsys):
    rows = [{"instruction": "Hi.", "input": "", "output": "Hello."}] + [
        {"instruction": "word " * 30, "input": "", "output": "the answer"}
    ] * 2
    cfg = TokenizeCfg(max_length=16, packing="none", overlong="truncate")
    stats, meta = tokendata.write_split(gpt2_tok, [rows], 3, tasks.TASKS["instruct"], [], cfg, tmp_path, "train")
    assert meta["examples"] == 1 and stats["overlong_examples"] == 2
    out = capsys.readouterr().out
    assert (
        "2 of 3 train examples are longer than tokenize.max_length=16: truncated (2 left with no trained token" in out
    )


def test_an_example_with_nothing_to_learn_is_an_error(tmp_path, gpt2_tok):
    rows = [{"text": "some text"}, {"text": ""}, {"text": ""}]  # "" is EOS alone: no token before it to learn from
    cfg = TokenizeCfg(max_length=16, packing="none")
    with pytest.raises(Exception, match=r"2 train examples have no trainable token \(first: #1\)"):
        tokendata.write_split(gpt2_tok, [rows], 3, tasks.TASKS["pretrain"], [], cfg, tmp_path, "train")


@pytest.mark.parametrize("packing", ["concat", "bfd"])
def test_tokenize_memory_does_not_grow_with_the_corpus(packing, tmp_path, gpt2_tok):
    """tracemalloc's peak while tokenizing 4x the examples stays within a small factor:
    the in-memory code it replaced held every example's ids (about 4x here)."""
    peaks = []
    for n in (10_000, 40_000):
        rows = _rows(n, seed=n)
        (tmp_path / f"{n}").mkdir()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        batches = (rows[i : i + 2048] for i in range(0, n, 2048))
        cfg = TokenizeCfg(max_length=128, packing=packing)
        tokendata.write_split(gpt2_tok, batches, n, tasks.TASKS["pretrain"], [], cfg, tmp_path / f"{n}", "train")
        peaks.append(tracemalloc.get_traced_memory()[1] - base)
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks
