"""Conversations: reading chat rows, rendering them with the model's chat template, and
which of the rendered text is trained.

A chat row is a list of turns, in either of the two shapes people bring:
- OpenAI `messages`: `{"role": "system" | "user" | "assistant", "content": ...}` (a
  `developer` turn is a system turn);
- ShareGPT `conversations`: `{"from": "system" | "human" | "gpt", "value": ...}`.
`conversation` checks one and stores it as canonical JSON text (the `messages` column of a
prepared row). Tool turns are refused: they are out of scope. An assistant turn with
`"weight": 0` (OpenAI fine-tuning's per-message switch, which axolotl reads too) stays in
the context but is not trained.

Rendering uses the tokenizer's own chat template (SmolLM2's ChatML), or, for a model that
has none (GPT-2), DEFAULT_TEMPLATE: the Zephyr layout, `<|user|>\\n...<eos>\\n`, with the
model's EOS token closing every turn. Training saves it with the model's tokenizer, so the
registered model renders conversations the way it was trained on them.

The loss mask comes from the rendered text, never from guessed token offsets: an assistant
turn's text is where rendering the conversation before it with the generation prompt ends,
up to and including the end-of-turn token (the tokenizer's EOS) in the rendering with the
turn. Each span is then tokenized on its own (`segments`), so a trained token never
straddles a boundary; the model learns every assistant turn and to stop after each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from tuneline.errors import TunelineError

# A change to its text is a template change: bump tasks.TEMPLATE_VERSION (tokenized data records it).
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# OpenAI's `developer` is its newer name for the system turn (o1 and later models)
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
# Where reasoning models' data keeps a turn's reasoning (DeepSeek-R1, Qwen3; gpt-oss's harmony)
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
TOOL_ROLES = {"tool", "function", "function_call", "observation", "ipython", "tool_call", "tool_response"}


def _content(v, at: str) -> str:
    """A turn's text: a string, or OpenAI's list of text parts joined."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in v):
        return "".join(str(p.get("text", "")) for p in v)
    raise TunelineError(
        f"{at}: a turn's content must be text, not {type(v).__name__} {str(v)[:40]!r}",
        "keep text turns only (images and other parts are not supported)",
    )


def conversation(value, at: str) -> str:
    """One row's turns, checked, as canonical `messages` JSON. `at` says where the row is."""
    turns = parse(value, at)
    roles = [t["role"] for t in turns]
    if "assistant" not in roles:
        raise TunelineError(f"{at}: the conversation has no assistant turn", "every row needs an answer to train on")
    if not any(trained(t) for t in turns):
        raise TunelineError(
            f"{at}: every assistant turn has weight 0, so the row trains nothing",
            "give the turn to learn weight 1, or remove the row",
        )
    if "user" not in roles[: roles.index("assistant")]:
        raise TunelineError(f"{at}: an assistant turn comes before any user turn", "start with a user turn")
    return json.dumps(turns, ensure_ascii=False)


def trained(turn: dict) -> bool:
    """Whether the loss covers `turn`: an assistant turn, unless its weight is 0."""
    return turn["role"] == "assistant" and turn.get("weight", 1) == 1


def _one_turn(value) -> bool:
    """Whether a served request is a single turn: what reaches the model when a list of
    turns is sent in MLflow's `inputs` (or `instances`). MLflow spreads the list over columns
    and passes on the first, as a dict or as its Python text ("{'role': 'user', ...}")."""
    import ast

    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return False  # a user message that starts with a brace
    return isinstance(value, dict) and bool({"role", "from"} & set(value))  # a turn in either shape


REQUEST_KEYS = ("messages", "conversations")  # an OpenAI chat request's body, a ShareGPT row


def _request_body(value):
    """The turns of a request in the shape of an OpenAI chat request's body (or a training
    row), `{"messages": [...]}` (or ShareGPT's `"conversations"`), as a dict or its JSON
    text; None for anything else (a text that is not such an object is a user message)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, dict) or not set(REQUEST_KEYS) & set(value):
        return None
    if other := sorted(set(value) - set(REQUEST_KEYS)):
        raise TunelineError(
            f"the request names {', '.join(map(repr, other))} beside its turns, which a served chat model does not read",
            'send {"messages": [turns]} alone; decoding settings are the served params (num_beams)',
        )
    if len(value) > 1:
        raise TunelineError('the request has both "messages" and "conversations"', "send the turns once")
    return next(iter(value.values()))


def request(value) -> list[dict]:
    """A served request's turns: one user message as text, or a conversation that ends with
    a user turn: a list of turns, `{"messages": [turns]}`, or the JSON text of either."""
    if (body := _request_body(value)) is not None:
        turns = parse(body, "the request's messages")
    else:
        if _one_turn(value):  # answering it would answer the conversation's first turn alone
            raise TunelineError(
                "the request is one turn, not a conversation: a list of turns sent in `inputs` reaches the model "
                "split into columns, and only the first is passed on",
                'send each conversation as its JSON text, e.g. {"inputs": ["[{\\"role\\": \\"user\\", '
                '\\"content\\": \\"Hi\\"}]"]}, or as {"dataframe_records": [{"0": [turns]}]}',
            )
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [{"role": "user", "content": value}]
        turns = parse(value, "the request")
    if turns[-1]["role"] != "user":
        raise TunelineError("the request's last turn is not a user turn", "end the conversation with the user's turn")
    return turns


def parse(value, at: str) -> list[dict]:
    """Turns in either shape as [{role, content}] (OpenAI roles), or a one-line error."""
    served = at.startswith("the request")  # a served request, not a training row: no row to leave out
    if hasattr(value, "tolist"):  # a served frame's cell: a numpy array of turns
        value = value.tolist()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TunelineError(
                f"{at}: the conversation is text but not JSON", "store the turns as a list of {role, content}"
            ) from None
    if isinstance(value, list) and not value:
        fix = (
            "send the conversation, ending with a user turn"
            if served
            else "give every row its turns, or remove the row"
        )
        raise TunelineError(f"{at}: the conversation has no turns", fix)
    if not isinstance(value, list):
        raise TunelineError(
            f"{at}: a conversation must be a list of turns, not {type(value).__name__}",
            'write [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]',
        )
    turns = []
    for k, t in enumerate(value):
        if not isinstance(t, dict):
            raise TunelineError(f"{at}: turn {k + 1} is not an object", 'write turns as {"role": ..., "content": ...}')
        role = t.get("role", t.get("from"))
        calls = t.get("tool_calls") or t.get("function_call")  # the second: OpenAI's older form
        if isinstance(role, str) and role.lower() in TOOL_ROLES or calls:
            raise TunelineError(
                f"{at}: turn {k + 1} "
                + (f"({role!r}) makes tool calls" if calls else f"is a tool turn ({role!r})")
                + "; tool calls are out of scope",
                "remove tool turns and the rows that need them",
            )
        if reasoning := next((key for key in REASONING_KEYS if t.get(key)), None):
            raise TunelineError(  # dropped, the model would learn the answers without their reasoning
                f"{at}: turn {k + 1} has {reasoning!r}, which tuneline does not render into the conversation",
                "put the reasoning in the turn's content (e.g. <think>...</think> before the answer), "
                f"or remove the {reasoning!r} key",
            )
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise TunelineError(
                f"{at}: turn {k + 1} has role {role!r}",
                "use system/user/assistant (OpenAI messages) or system/human/gpt (ShareGPT conversations)",
            )
        role = ROLES[role.lower()]
        if role == "system" and k:
            raise TunelineError(f"{at}: turn {k + 1} is a system turn after the first", "keep one system turn, first")
        content = t.get("content", t.get("value"))
        if content is None:
            raise TunelineError(
                f"{at}: turn {k + 1} has no content", "give each turn its text as 'content' (ShareGPT: 'value')"
            )
        text = _content(content, at)
        if not text.strip() and role != "system":  # an empty answer teaches the model to say nothing
            fix = "give every user and assistant turn its text"
            if not served:
                fix += ", or remove the row (prepare.bad_rows=skip leaves out such rows)"
            raise TunelineError(f"{at}: turn {k + 1} ({role}) is empty", fix)
        weight = t.get("weight", 1)  # OpenAI fine-tuning's (and axolotl's) per-turn switch
        if isinstance(weight, bool) or weight not in (0, 1):
            raise TunelineError(
                f"{at}: turn {k + 1} has weight {weight!r}", "a weight is 0 (not trained) or 1 (trained)"
            )
        if weight == 1 and role != "assistant" and "weight" in t:
            raise TunelineError(
                f"{at}: turn {k + 1} ({role}) has weight 1, but only assistant turns are trained",
                f"give {role} turns weight 0 or none",
            )
        turns.append({"role": role, "content": text} | ({"weight": 0} if role == "assistant" and not weight else {}))
    return turns


def turns(row: dict) -> list[dict]:
    return json.loads(row["messages"])


def template(tok) -> str:
    return getattr(tok, "chat_template", None) or DEFAULT_TEMPLATE


def render(tok, messages: list[dict], generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(
        messages, chat_template=template(tok), tokenize=False, add_generation_prompt=generation_prompt
    )


def _not_stable(why: str) -> TunelineError:
    return TunelineError(
        f"the model's chat template {why}, so the assistant turns cannot be found in the rendered text",
        "use a model whose template renders each turn after the ones before it (ChatML, Zephyr), "
        "or remove its chat_template to use tuneline's default",
    )


def segments(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn, from
    where the generation prompt ends to its end-of-turn token (the tokenizer's EOS)
    inclusive, is trained (unless its weight is 0); everything else is not."""
    full, eot = render(tok, messages), tok.eos_token
    out, pos = [], 0
    for i, m in enumerate(messages):
        if not trained(m):  # a weight-0 answer stays in the context, untrained
            continue
        head, upto = render(tok, messages[:i], True), render(tok, messages[: i + 1])
        if not (upto.startswith(head) and full.startswith(upto) and len(head) >= pos):
            raise _not_stable("does not render a conversation's turns one after another")
        end = upto.find(eot, len(head) + len(m["content"]))
        if end < 0:
            raise _not_stable(f"does not close an assistant turn with the EOS token {eot!r}")
        end += len(eot)
        out += [(full[pos : len(head)], False), (full[len(head) : end], True)]
        pos = end
    return [s for s in out + [(full[pos:], False)] if s[0]]


def last_turn(row: dict) -> tuple[list[dict], str]:
    """(the conversation before the last trained assistant turn, that turn's text): what
    evaluation asks the model and the reference it scores the answer against."""
    messages = turns(row)
    k = max(i for i, m in enumerate(messages) if trained(m))
    return messages[:k], messages[k]["content"]


def prompt_answer(tok, row: dict) -> tuple[str, str]:
    """The prompt (the context rendered with the generation prompt) and reference answer."""
    context, answer = last_turn(row)
    return render(tok, context, True), answer


# --- Alpaca records as conversations ------------------------------------------------------

SYSTEM = "You are a helpful assistant."
# Conversation shapes, in turn: (records chained into it, with a system turn)
SHAPES = ((1, False), (1, True), (2, False), (2, True))


def from_alpaca(records: Iterable[dict]) -> Iterator[dict]:
    """Alpaca/Dolly records (instruction, input or context, output or response), in order, as
    `messages` rows: the shapes of SHAPES in turn, a two-turn row chaining two records (the
    second instruction asked after the first answer). For data with no conversations: the
    chat recipe's smoke and test data."""
    from tuneline.readers import LINE

    pending: list[dict] = []
    k = 0
    for r in records:
        pending.append(r)
        n, system = SHAPES[k % len(SHAPES)]
        if len(pending) < n:
            continue
        messages = [{"role": "system", "content": SYSTEM}] if system else []
        for rec in pending:
            context = rec.get("input") or rec.get("context") or ""
            ask = str(rec.get("instruction", "")) + (f"\n\n{context}" if context else "")
            messages += [
                {"role": "user", "content": ask},
                {"role": "assistant", "content": rec.get("output", rec.get("response"))},
            ]
        yield {"messages": messages} | ({LINE: pending[0][LINE]} if LINE in pending[0] else {})
        pending, k = [], k + 1
