"""The chat task (tuneline/chat.py): both row shapes, the loss on exactly the assistant
turns and their end-of-turn tokens in SmolLM2's template and in the default one, packing,
over-long rows, Alpaca records as conversations, evaluation's last turn, and serving."""

import json

import numpy as np
import pytest

from tuneline import chat, tasks, tokendata
from tuneline.config import TokenizeCfg
from tuneline.errors import TunelineError
from tuneline.evaluation import answer_branches, prompts_and_targets
from tuneline.modeling import load_tokenizer
from tuneline.packing import IGNORE
from tuneline.rows import task_rows
from tuneline.tokendata import read_rows
from tuneline.tokenization import encode_batch, encode_rows, label_ids

TASK = tasks.TASKS["chat"]
SYSTEM = {"role": "system", "content": "Answer briefly."}
CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [
        SYSTEM,
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4, since 2 + 2 = 4."},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": "8.\n\n### Why\nTwice 4 is 8."},  # a markdown header inside an answer
    ],
    [SYSTEM, {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
]


def _rows(convs):
    return [{"messages": chat.conversation(c, "test")} for c in convs]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "tiny-gpt2"])
def tok(request, model_cache):
    return load_tokenizer(request.param)


def test_the_loss_is_on_every_assistant_turn_and_its_end_of_turn_token_only(tok):
    """SmolLM2's ChatML template, and the default template for GPT-2 (which has none)."""
    assert bool(tok.chat_template) == ("SmolLM" in chat.render(tok, CONVERSATIONS[0]))
    ids, spans = encode_batch(tok, _rows(CONVERSATIONS), TASK, [])
    for x, s, conv in zip(ids, spans, CONVERSATIONS):
        # the pieces, tokenized apart, are the tokens of the whole rendered conversation
        assert x == tok(chat.render(tok, conv), add_special_tokens=False)["input_ids"]
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        trained = [tok.decode(x[a:b]) for a, b in s]
        assert trained == [a + tok.eos_token for a in answers]  # each turn whole, and the token that ends it
        labels = label_ids(x, s)
        untrained = tok.decode([t for t, lab in zip(x, labels) if lab == IGNORE])
        assert not any(a in untrained for a in answers)  # no assistant text outside the spans
        assert all(m["content"] in untrained for m in conv if m["role"] != "assistant")


def test_an_assistant_turn_of_weight_0_stays_in_the_context_untrained(tok):
    """OpenAI fine-tuning's per-message `weight` (axolotl reads it too): 0 leaves a turn out
    of the loss, and out of evaluation's reference."""
    conv = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "5.", "weight": 0},  # a wrong answer the next turn corrects
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "Sorry: 4.", "weight": 1},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome.", "weight": 0},
    ]
    rows = _rows([conv])
    (x,), (s,) = encode_batch(tok, rows, TASK, [])
    assert [tok.decode(x[a:b]) for a, b in s] == ["Sorry: 4." + tok.eos_token]
    assert x == tok(chat.render(tok, conv), add_special_tokens=False)["input_ids"]  # every turn is still there
    (prompt,), (target,) = prompts_and_targets(TASK, rows, [], tok)
    assert target == "Sorry: 4." and prompt == chat.render(tok, conv[:3], generation_prompt=True)
    # weight 1 (or none) is the default: the stored row is the same as without it
    assert _rows([[{**m, "weight": 1} if m["role"] == "assistant" else m for m in CONVERSATIONS[0]]]) == _rows(
        CONVERSATIONS[:1]
    )


def test_both_row_shapes_and_other_column_names_read_as_the_same_rows():
    sharegpt = [
        {
            "conversations": [
                {"from": {"assistant": "gpt", "user": "human"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in c
            ]
        }
        for c in CONVERSATIONS
    ]
    openai = [{"messages": c} for c in CONVERSATIONS]
    as_text = [{"dialog": json.dumps(c)} for c in CONVERSATIONS]  # a CSV/Parquet column of JSON text
    read = [
        next(task_rows([rows], TASK, columns, [], "data"))
        for rows, columns in ((sharegpt, {}), (openai, {}), (as_text, {"messages": "dialog"}))
    ]
    assert read[0] == read[1] == read[2] == _rows(CONVERSATIONS)
    # OpenAI's newer name for the system turn
    developer = [{"role": "developer", "content": SYSTEM["content"]}, *CONVERSATIONS[2][1:]]
    assert next(task_rows([[{"messages": developer}]], TASK, {}, [], "data")) == _rows(CONVERSATIONS[2:])
    # A file joining the two datasets: each row is read in its own shape
    assert next(task_rows([[sharegpt[0], openai[1]]], TASK, {}, [], "data")) == _rows(CONVERSATIONS[:2])


@pytest.mark.parametrize(
    "turns, message",
    [
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}], "tool turn .* out of scope"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{}]}],
            r"turn 2 \('assistant'\) makes tool",
        ),
        ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], "turn 2 has role 'bot'"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "function_call": {"name": "f"}}],
            "tool",
        ),
        # dropped, the model would learn the answers without the reasoning that was meant to come first
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": "z"}],
            r"turn 2 has 'reasoning_content', which tuneline does not render into the conversation. Fix: put the",
        ),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}], "trains nothing"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}], "turn 2 has weight 2"),
        (
            [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}],
            r"turn 1 \(user\) has weight 1, but only assistant turns are trained",
        ),
        ([{"role": "user", "content": "x"}], "no assistant turn"),
        ([{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}], "before any user turn"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}], "content must be text"),
        ([{"role": "user", "content": "x"}, SYSTEM, {"role": "assistant", "content": "y"}], "system turn after"),
        ("not json", "not JSON"),
        ([], "the conversation has no turns"),
        ([{"role": "user"}, {"role": "assistant", "content": "y"}], r"turn 1 has no content. Fix: give each turn"),
        ({"role": "user", "content": "x"}, "must be a list of turns, not dict"),
        # an empty answer would teach the model to answer nothing
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}], r"turn 2 \(assistant\) is empty"),
        ([{"from": "human", "value": ""}, {"from": "gpt", "value": "y"}], r"turn 1 \(user\) is empty.*bad_rows=skip"),
    ],
)
def test_a_bad_conversation_is_one_line_naming_its_row(turns, message):
    with pytest.raises(TunelineError, match=message) as e:
        next(task_rows([[{"messages": turns}]], TASK, {}, [], "data.jsonl"))
    assert "data.jsonl: row 1" in str(e.value) and "\n" not in str(e.value)


def test_packing_keeps_each_conversations_labels_apart(tmp_path, tok):
    rows = _rows(CONVERSATIONS * 4)
    cfg = TokenizeCfg(max_length=256, packing="bfd")
    _, meta = tokendata.write_split(tok, [rows], len(rows), TASK, [], cfg, tmp_path, "train")
    (tmp_path / "meta.json").write_text(json.dumps({"max_length": 256, "splits": {"train": meta}}))
    want = sorted((e.input_ids, e.labels) for e in encode_rows(tok, rows, TASK, []))
    got, packed = [], read_rows("train", tmp_path)[:]
    assert len(packed) < len(rows)  # conversations share rows
    for r in packed:
        for start, n in zip(np.cumsum([0, *r["seq_lens"]]), r["seq_lens"]):
            got.append((r["input_ids"][start : start + n].tolist(), r["labels"][start : start + n].tolist()))
    assert sorted(got) == want


def test_a_row_whose_assistant_turns_are_all_cut_follows_tokenize_overlong(tmp_path, gpt2_tok, capsys):
    long_user = {"role": "user", "content": "word " * 60}
    late = [long_user, {"role": "assistant", "content": "Done."}]  # the answer lies past max_length
    early = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        long_user,
        {"role": "assistant", "content": "Done."},
    ]  # the first answer fits, the second does not
    rows = _rows([CONVERSATIONS[0], late, early])

    def write(overlong, name):
        cfg = TokenizeCfg(max_length=32, packing="none", overlong=overlong)
        return tokendata.write_split(gpt2_tok, [rows], 3, TASK, [], cfg, tmp_path / name, "train")

    with pytest.raises(TunelineError, match="2 of 3 train examples are longer than tokenize.max_length=32"):
        (tmp_path / "e").mkdir(), write("error", "e")
    (tmp_path / "d").mkdir()
    assert write("drop", "d")[1]["examples"] == 1
    (tmp_path / "t").mkdir()
    meta = write("truncate", "t")[1]
    (tmp_path / "t/meta.json").write_text(json.dumps({"max_length": 32, "splits": {"train": meta}}))
    assert meta["examples"] == 2  # `late` has nothing left to learn: dropped, and said
    assert "truncated (1 left with no trained token: dropped)" in capsys.readouterr().out
    kept = read_rows("train", tmp_path / "t")[:]
    trained = [gpt2_tok.decode([t for t in r["labels"] if t != IGNORE]) for r in kept]
    assert sorted(trained) == sorted(["Blue.<|endoftext|>", "Hello.<|endoftext|>"])


def test_alpaca_records_become_one_and_two_turn_conversations_with_and_without_a_system_turn():
    records = [
        {"instruction": f"Task {i}", "input": "ctx" if i == 1 else "", "output": f"Answer {i}"} for i in range(6)
    ]
    convs = [r["messages"] for r in chat.from_alpaca(records)]
    assert [[m["role"] for m in c] for c in convs] == [
        ["user", "assistant"],
        ["system", "user", "assistant"],
        ["user", "assistant", "user", "assistant"],
        ["system", "user", "assistant", "user", "assistant"],
    ]
    assert convs[1][1]["content"] == "Task 1\n\nctx" and convs[3][-1]["content"] == "Answer 5"
    assert all(chat.conversation(c, "x") for c in convs)


def test_evaluation_asks_the_conversation_before_the_last_answer_and_scores_that_answer(tok):
    rows = _rows(CONVERSATIONS[1:2])
    (prompt,), (target,) = prompts_and_targets(TASK, rows, [], tok)
    assert prompt == chat.render(tok, CONVERSATIONS[1][:4], generation_prompt=True)
    assert target == CONVERSATIONS[1][4]["content"]
    (branch,), _ = answer_branches(tok, rows, TASK, [])
    assert tok.decode(branch[0]) == target + tok.eos_token  # perplexity: the last turn, as trained


def test_a_served_chat_model_answers_a_message_or_a_conversation(tiny_gpt2, gpt2_tok):
    from tuneline.serving import Answerer

    served = Answerer()
    served.model, served.tok = tiny_gpt2, gpt2_tok
    served.config = {
        "task": "chat",
        "labels": [],
        "max_new_tokens": 4,
        "num_beams": 1,
        "constrain": "none",
        "precision": "fp32",
        "batch_size": 4,
    }
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    prompts = served.prompts(["Bye", turns, json.dumps(turns)])
    assert prompts[0] == "<|user|>\nBye<|endoftext|>\n<|assistant|>\n"
    assert prompts[1] == prompts[2] == chat.render(gpt2_tok, turns, generation_prompt=True)
    assert all(isinstance(a, str) for a in served.predict(None, ["Bye", turns]))
    with pytest.raises(TunelineError, match="last turn is not a user turn"):
        served.prompts([turns[:2]])
    # An OpenAI chat request's body (or a training row), as a dict or its JSON text, is its turns
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye"}]
    bodies = [{"messages": turns}, json.dumps({"messages": turns}), json.dumps({"conversations": sharegpt})]
    assert served.prompts(bodies) == [prompts[1]] * 3
    with pytest.raises(TunelineError, match=r"^input 2 of 2: the request's last turn is not a user turn"):
        served.prompts(["Bye", {"messages": turns[:2]}])
    with pytest.raises(TunelineError, match=r"names 'model', 'temperature' beside its turns.*Fix: send"):
        served.prompts([{"messages": turns, "model": "x", "temperature": 0.7}])
    with pytest.raises(TunelineError, match=r"the request's messages: the conversation is text but not JSON"):
        served.prompts(['{"messages": "Bye"}'])
    with pytest.raises(TunelineError, match=r"messages: the conversation has no turns. Fix: send the conversation,"):
        served.prompts(['{"messages": []}'])  # not "give every row its turns": a request is no row
    assert served.prompts(['{"text": "Bye"}'])[0].startswith('<|user|>\n{"text": "Bye"}')  # any other object: a message


def test_over_http_a_conversation_is_answered_whole_or_refused_never_cut_to_its_first_turn(scoring_app):
    """MLflow's scoring server (what `mlflow models serve` runs): a list of turns in
    `inputs` reaches the model split into columns, only the first passed on; it answered
    "Hi" as if it were the whole conversation."""
    model, http = scoring_app("chat")
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    whole = model.unwrap_python_model().predict(None, [json.dumps(turns)])
    assert whole != model.unwrap_python_model().predict(None, ["Hi"])  # the first turn alone answers otherwise
    bodies = (
        {"inputs": [json.dumps(turns)]},
        {"dataframe_records": [{"0": turns}]},
        {"inputs": [json.dumps({"messages": turns})]},
        {"dataframe_records": [{"messages": turns}]},
        {"inputs": [{"messages": turns}]},
        {
            "instances": [
                {"conversations": [{"from": t["role"].replace("user", "human"), "value": t["content"]} for t in turns]}
            ]
        },
    )
    for body in bodies:
        said = http.post("/invocations", json=body)
        assert said.status_code == 200 and said.json()["predictions"] == whole, said.text
    said = http.post("/invocations", json={"inputs": [json.dumps({"messages": turns, "temperature": 0.7})]})
    assert said.status_code == 400 and "names 'temperature' beside its turns" in said.text, said.text
    for body in ({"inputs": [turns]}, {"instances": [turns]}):
        said = http.post("/invocations", json=body)
        assert said.status_code != 200 and "the request is one turn, not a conversation" in said.text, said.text
    # A message that merely starts with a brace, or is a dict but no turn, is still a message.
    for text in ("{braces} are fine", "{'question': 'why?'}"):
        assert chat.request(text) == [{"role": "user", "content": text}]
