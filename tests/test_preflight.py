"""The preflight: a run bound to fail on its params fails before anything is written, with
one line; and for any params at all it says one line or nothing, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneline import preflight
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.params_file import parse_params


def test_the_default_params_pass(model_cache):
    preflight.check(Params().model_copy(update={"model": Params().model.model_copy(update={"name": "tiny-gpt2"})}))


@pytest.mark.parametrize(
    "name, refused",
    [
        ("models/merged", True),
        ("models/merged/", True),
        ("{root}/models/merged", True),  # the same folder, named absolutely
        ("checkpoints/train/step-3", True),
        ("my-base", False),  # a copy of it, as the fix says
        ("smollm2-135m-instruct", False),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
    ],
)
def test_the_base_model_may_not_be_a_folder_the_pipeline_writes(name, refused):
    """`model.name=models/merged` (train on from the last run) made train replace its own
    base: evaluate then scored the new model as the base too (delta 0) and the merge parity
    check failed at register, after the whole run."""
    from tuneline import ROOT

    name = name.format(root=ROOT)
    if refused:
        with pytest.raises(
            TunelineError, match=r"is in (models|checkpoints/train)/, where this pipeline writes.*cp -r"
        ):
            preflight.check_base_is_not_an_output(name)
    else:
        preflight.check_base_is_not_an_output(name)


@pytest.mark.parametrize(
    "spec, fix",
    [
        ("data/prepared/train.parquet", "cp data/prepared/train.parquet my-data.parquet, then --set prepare.source="),
        ("data/prepared/*.parquet", 'cp -r data/prepared my-data, then --set "prepare.source=my-data/*.parquet"'),
    ],
)
def test_a_source_in_a_folder_the_pipeline_writes_is_refused(spec, fix, tmp_path, monkeypatch):
    """prepare.source=data/prepared/train.parquet ran, and each run then drew its splits
    from the last run's train split."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "train.parquet").write_bytes(b"rows")
    (tmp_path / "my-data.parquet").write_bytes(b"rows")
    params = parse_params({"prepare": {"source": str(tmp_path / spec)}})
    with pytest.raises(TunelineError, match="is in data/prepared/, which this pipeline rewrites") as e:
        preflight.check_sources(params)
    assert fix in str(e.value)
    assert preflight.written_folder(tmp_path / "my-data.parquet") is None  # the copy is not


@pytest.mark.parametrize(
    "over, says",
    [
        ({"train": {"lora_targets": ["c_atn"]}}, "has no module named 'c_atn'. Fix: did you mean 'c_attn'?"),
        ({"register": {"model_name": "team/descrambler"}}, "register.model_name 'team/descrambler'"),
        ({"register": {"model_name": "a:b"}}, "':'"),
        ({"tokenize": {"max_length": 2048}}, "positions for (1024). Fix: set tokenize.max_length to at most 1024"),
        ({"model": {"name": "no-such-model-here"}}, "cannot load model 'no-such-model-here'"),
    ],
)
def test_what_only_the_model_or_mlflow_can_refuse_is_refused_up_front(over, says, model_cache):
    params = parse_params({"model": {"name": "tiny-gpt2"}} | over)
    with pytest.raises(TunelineError) as e:
        preflight.check(params, store=False)
    assert says in str(e.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="QLoRA runs where CUDA is")
def test_qlora_without_a_cuda_gpu_is_refused_up_front_saying_what_to_use(model_cache):
    params = parse_params({"model": {"name": "tiny-gpt2"}, "train": {"quantize": "nf4"}})
    with pytest.raises(TunelineError, match=r"'nf4' \(QLoRA\) needs a CUDA GPU.*Fix: set train.quantize: none"):
        preflight.check(params, store=False)
    with pytest.raises(TunelineError, match="train.quantize .nf4. .* train.method is .full."):
        parse_params({"train": {"quantize": "nf4", "method": "full"}})


def test_more_data_parallel_processes_than_gpus_or_cores_are_refused_up_front(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(preflight.os, "sched_getaffinity", lambda pid: {0, 1})
    preflight.check_nproc(2)
    with pytest.raises(
        TunelineError, match=r"train.nproc=64 .* this machine has 2 CPU core\(s\) and no GPU.*at most 2"
    ):
        preflight.check(parse_params({"train": {"nproc": 64}}), store=False, model=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    preflight.check_nproc(4)
    with pytest.raises(TunelineError, match=r"train.nproc=8 .* has 4 GPU\(s\). Fix: set train.nproc to at most 4"):
        preflight.check_nproc(8)


def test_full_fine_tuning_does_not_check_lora_targets(model_cache):
    preflight.check(parse_params({"model": {"name": "tiny-gpt2"}, "train": {"method": "full", "lora_targets": ["x"]}}))


def test_a_source_whose_first_rows_prepare_would_refuse_is_refused_up_front(tmp_path):
    """Columns, types and labels of a local file's first batch, by prepare's own checks; the
    file's later rows are prepare's to read (it names the line)."""
    from tuneline.readers import BATCH_ROWS
    from tuneline.rows import task_source

    def params(name: str, text: str, **prepare):
        (tmp_path / name).write_text(text)
        return parse_params({"prepare": {"source": str(tmp_path / name), **prepare}})

    with pytest.raises(TunelineError, match="missing column 'target'.*it has: 'sentence'"):
        preflight.check(params("a.csv", "sentence\nthe cat sat on the mat.\n"), store=False, model=False)
    with pytest.raises(TunelineError, match="has no rows"):
        preflight.check(params("b.csv", "target\n"), store=False, model=False)
    late = params("c.jsonl", '{"target": "a sentence of words here."}\n' * BATCH_ROWS + "{not json\n")
    preflight.check(late, store=False, model=False)  # a valid first batch passes; prepare finds the line
    with pytest.raises(TunelineError, match=f"line {BATCH_ROWS + 1}"):
        for _ in task_source(late.prepare.source, late.prepare, "prepare.source")[0]:
            pass


# Values a user might type, valid or not, for the keys that reach the model and MLflow.
_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.text(max_size=8), max_size=3),
)
_params = st.fixed_dictionaries(
    {},
    optional={
        "seed": _junk,
        "model": st.fixed_dictionaries(
            {"name": st.sampled_from(["tiny-gpt2", "gpt2-scratch-tiny", "no-such-model", "./nowhere"])}
        ),
        "tokenize": st.fixed_dictionaries(
            {},
            optional={
                "max_length": st.one_of(st.integers(-5, 5000), _junk),
                "overlong": st.sampled_from(["drop", "error", "truncate", "cut"]),
            },
        ),
        "train": st.fixed_dictionaries(
            {},
            optional={
                "method": st.sampled_from(["lora", "full", "qlora"]),
                "epochs": _junk,
                "lr": _junk,
                "lora_targets": st.one_of(
                    st.none(), st.lists(st.sampled_from(["c_attn", "c_fc", "q_proj", "attn", ""]), max_size=3)
                ),
                "lora_layers": _junk,
            },
        ),
        "register": st.fixed_dictionaries(
            {}, optional={"model_name": st.one_of(st.text(max_size=12), _junk), "alpha": _junk}
        ),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_params)
def test_any_params_pass_or_give_our_one_line_error(raw, model_cache):
    try:
        preflight.check(parse_params(raw, "params.yaml"), store=False)
    except TunelineError as e:
        assert "\n" not in str(e) and str(e).strip()
