import math
import random

import pytest
import torch

from components.train import batch_indices, lr_at
from tuneline.config import TrainCfg
from tuneline.loss import loss_sum
from tuneline.packing import Example, collate, pack


def test_schedule_warms_up_then_decays_to_a_tenth():
    cfg = TrainCfg(lr=1.0, warmup_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_data_order_is_a_pure_function_of_the_step():
    cfg = TrainCfg(batch_size=3, grad_accum=2)
    epoch = [i for step in range(2) for m in range(2) for i in batch_indices(step, m, 10, cfg, seed=1)]
    # the first 4 micro-batches cover 10 rows exactly once (last batch short), then epoch 2
    assert sorted(epoch) == list(range(10))
    assert batch_indices(5, 1, 10, cfg, 1) == batch_indices(5, 1, 10, cfg, 1)
    assert batch_indices(0, 0, 10, cfg, 1) != batch_indices(0, 0, 10, cfg, 2)


def test_accumulation_equals_one_big_batch(model_cache):
    """k micro-batches weighted by trainable tokens give the gradient of one k-times batch."""
    from tuneline.modeling import load_model

    model = load_model("tiny-gpt2").eval()  # eval: no dropout, so both runs see the same network
    rng = random.Random(0)
    ex = [Example(ids := [rng.randrange(1, 1000) for _ in range(rng.randint(4, 30))],
                  [-100] * 2 + ids[2:]) for _ in range(8)]
    rows = pack(ex, 64, "bfd")

    def grads(micro_batches):
        model.zero_grad()
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        for b in micro_batches:
            s, _ = loss_sum(model, b)
            (s / total).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    one = grads([collate(rows, 0)])
    split = grads([collate(rows[:1], 0), collate(rows[1:], 0)])
    assert len(rows) > 1 and not math.isclose(float(one.norm()), 0.0)
    torch.testing.assert_close(one, split, atol=1e-6, rtol=1e-4)
