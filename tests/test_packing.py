import copy
import random

import pytest
import torch
from conftest import tiny_llama
from torch.nn.attention.flex_attention import BlockMask

from tuneline.attention import BUCKET, attention_inputs, dense_mask, enable_flex, enable_segments, segment_groups
from tuneline.loss import loss_sum
from tuneline.packing import IGNORE, Example, bfd, collate, concat, groups, pack


def test_bfd_keeps_every_example_whole_and_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = groups(*bfd(lengths, 128))
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # best-fit decreasing is within 11/9 OPT + 1; the volume bound is a lower bound on OPT
    assert len(bins) <= 11 / 9 * (sum(lengths) / 128 + 1) + 1


def test_bfd_puts_an_item_in_the_tightest_bin():
    # 6 opens bin A (free 4), 5 opens bin B (free 5); 4 must go to A (tightest fit)
    assert groups(*bfd([6, 5, 4], 10)) == [[0, 2], [1]]


def test_bfd_refuses_an_example_longer_than_a_sequence():
    with pytest.raises(ValueError, match="capacity"):
        bfd([5, 11], 10)


def test_collate_isolates_examples_and_restarts_positions():
    rows = pack([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5], [IGNORE, 5])], 8, "bfd")
    b = collate(rows, pad_id=0, length=6)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0]
    assert b["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 0]
    m = dense_mask(b["segment_ids"])[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False]  # 2nd example sees only itself
    assert m[2].tolist() == [True, True, True, False, False, False]
    assert m[5, 5]  # padding attends to itself: no all-masked row, no NaN
    assert b["labels"][0].tolist() == [IGNORE, 2, 3, IGNORE, 5, IGNORE]


@pytest.mark.parametrize("attention", ["sdpa", "flex", "segments"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_logits_equal_each_example_alone(arch, attention, tiny_gpt2):
    """Every way we train with isolates exactly: sdpa with the dense block mask, flex
    attention with the block mask (CUDA; here unfused, on the CPU), and sdpa per example
    (the CPU)."""
    model = copy.deepcopy(tiny_gpt2).eval() if arch == "gpt2" else tiny_llama(300)
    {"sdpa": lambda m: m.set_attn_implementation("sdpa"), "flex": enable_flex, "segments": enable_segments}[attention](
        model
    )
    rng = random.Random(1)
    examples = [Example(ids := [rng.randrange(1, 300) for _ in range(rng.randint(3, 20))], ids) for _ in range(9)]
    rows = pack(examples, 48, "bfd")
    assert max(len(r["seq_lens"]) for r in rows) > 1
    packed = collate(rows, pad_id=0)
    how = attention_inputs(model, packed["segment_ids"])
    assert isinstance(how["attention_mask"], BlockMask) == (attention == "flex")
    assert ("segments" in how) == (attention == "segments")
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], **how).logits
        for b, row in enumerate(rows):
            start = 0
            for L in row["seq_lens"]:
                alone = model(input_ids=torch.tensor([row["input_ids"][start : start + L]])).logits[0]
                torch.testing.assert_close(logits[b, start : start + L], alone, atol=1e-5, rtol=0)
                start += L


def test_padded_inference_on_the_cpu_gives_transformers_sdpa_logits_with_grouped_kv_heads():
    """Generation's left-padded prefill and its cached decoding steps run
    attention.masked_inference on a SEGMENTS model (fp32, K/V heads shared by query
    heads in place): the logits of transformers' own sdpa path, and a row alone's."""
    from transformers import DynamicCache

    ref, model = tiny_llama(300), tiny_llama(300)  # 4 query heads over 2 K/V heads
    enable_segments(model)
    ids = torch.tensor([[0, 0, 0, 5, 17, 42, 9], [3, 8, 11, 5, 17, 42, 9]])  # row 0 left-padded
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        caches, steps = [DynamicCache(), DynamicCache()], []
        for m, cache in zip((ref, model), caches):
            first = m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
            nxt = m(
                input_ids=torch.tensor([[7], [7]]),
                attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                position_ids=pos[:, -1:] + 1,
                past_key_values=cache,
            ).logits
            steps.append((first, nxt))
        alone = ref(input_ids=torch.tensor([[5, 17, 42, 9, 7]])).logits
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(steps[1][0][0, 3:], alone[0, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(steps[1][1][0, -1], alone[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_per_example_attention_trains_as_each_example_alone_across_length_groups(arch, tiny_gpt2):
    """The CPU's per-example attention groups examples by padded length (several groups
    here): the packed loss and every gradient equal those of the examples run one by one."""
    model = copy.deepcopy(tiny_gpt2).eval() if arch == "gpt2" else tiny_llama(300)
    enable_segments(model)
    rng = random.Random(2)
    examples = [
        Example(ids := [rng.randrange(1, 300) for _ in range(rng.randint(2, 100))], [IGNORE] + ids[1:])
        for _ in range(12)
    ]  # a first token is never a target: it would be predicted from the previous example
    packed = collate(pack(examples, 128, "bfd"), pad_id=0)
    lengths = {int(valid.shape[1]) for _, valid in segment_groups(packed["segment_ids"]).groups}
    assert len(lengths) >= 3 and all(L % BUCKET == 0 for L in lengths)

    total, n = loss_sum(model, packed)
    total.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    alone = sum(
        torch.nn.functional.cross_entropy(
            model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1], torch.tensor(e.input_ids[1:]), reduction="sum"
        )
        for e in examples
    )
    alone.backward()
    assert n == sum(len(e.input_ids) - 1 for e in examples)
    torch.testing.assert_close(total, alone, rtol=1e-5, atol=1e-4)
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)


def test_full_single_example_rows_take_the_plain_causal_path_with_the_same_logits(tiny_gpt2):
    rng = random.Random(3)
    docs = [Example(ids := [rng.randrange(1, 300) for _ in range(40)], ids) for _ in range(5)]
    batch = collate(concat(docs, 32), pad_id=0)
    assert attention_inputs(tiny_gpt2, batch["segment_ids"]) == {"attention_mask": None}  # sdpa's causal kernel
    with torch.no_grad():
        causal = tiny_gpt2(input_ids=batch["input_ids"]).logits
        masked = tiny_gpt2(input_ids=batch["input_ids"], attention_mask=dense_mask(batch["segment_ids"])).logits
    torch.testing.assert_close(causal, masked, atol=1e-5, rtol=0)
    padded = collate(concat(docs, 32, drop_remainder=False)[-2:], pad_id=0)  # a shorter last row: padding
    assert attention_inputs(tiny_gpt2, padded["segment_ids"]) != {"attention_mask": None}


def test_packed_loss_equals_unpacked_loss(tiny_gpt2, gpt2_tok):
    from tuneline.tasks import TASKS
    from tuneline.tokenization import encode_rows

    rows = [
        {"source": "cat the sat", "target": "the cat sat"},
        {"source": "dog a barked loudly", "target": "a dog barked loudly"},
        {"source": "rain it today will", "target": "it will rain today"},
    ]
    ex = encode_rows(gpt2_tok, rows, TASKS["descramble"], [])
    with torch.no_grad():
        s_packed, n_packed = loss_sum(tiny_gpt2, collate(pack(ex, 64, "bfd"), gpt2_tok.pad_token_id))
        s_single, n_single = loss_sum(tiny_gpt2, collate(pack(ex, 64, "none"), gpt2_tok.pad_token_id))
    assert n_packed == n_single == sum(sum(x != IGNORE for x in e.labels) for e in ex)
    assert float(s_packed) == pytest.approx(float(s_single), rel=1e-5)


def test_concat_keeps_every_token_but_the_final_remainder():
    rng = random.Random(2)
    docs = [Example(ids := [rng.randrange(1, 99) for _ in range(rng.randint(1, 70))], ids) for _ in range(40)]
    total = sum(len(d.input_ids) for d in docs)
    rows = concat(docs, 32)
    assert all(len(r["input_ids"]) == 32 and r["seq_lens"] == [32] for r in rows)
    assert len(rows) * 32 == total - total % 32  # in = out + remainder (< one block)
    flat = [t for d in docs for t in d.input_ids]
    assert [t for r in rows for t in r["input_ids"]] == flat[: len(rows) * 32]  # order kept, no EOS invented
    # evaluation keeps the remainder as a shorter last row, which collates on its own
    kept = concat(docs, 32, drop_remainder=False)
    assert sum(len(r["input_ids"]) for r in kept) == total
    assert all(r["seq_lens"] == [len(r["input_ids"])] for r in kept)
    assert collate(kept[-1:], pad_id=0)["input_ids"].shape == (1, total % 32)
