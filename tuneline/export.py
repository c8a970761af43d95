"""`tuneline export`: a registered version as a plain Hugging Face model folder, for use
outside tuneline (transformers, vLLM, llama.cpp's converter) or on the hub.

The folder holds the version's merged weights and tokenizer exactly as registered, its
`generation_config.json` set to decode as the version was evaluated (greedy or its beams,
its answer budget), a chat template where the chat task trained with tuneline's default
one, and a README.md: the hub's metadata, a transformers example that answers one input
the way `tuneline predict --free` does, and the version's model card. The example is run
before anything is written, and its answer must equal tuneline's own decoding of the same
model (nothing is exported that would answer differently). The folder appears whole or
not at all; `push` uploads it to a hub repository.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

from tuneline import request, tasks
from tuneline.errors import TunelineError
from tuneline.io import share_modes, unwritable

# Built-in names whose weights are a hub model's (SmolLM2 ships as a GGUF Q4_1 file, dequantised).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# What a user runs with transformers alone. `answer` is the version's prompt, decoding and
# cut; MODEL is the folder (or the hub repository it was pushed to).
EXAMPLE = """\
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = {model!r}
tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL)


def answer({signature}) -> str:
    {prompt_lines}
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    {generate_line}
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return {cut}
"""


def fields(task: tasks.Task) -> tuple[str, ...]:
    """The example's arguments: the fields a served request names (`text` for pretrain,
    which continues it; `messages` for chat: a user message, or a conversation's turns)."""
    return task.serve_fields or (("messages",) if task.chat else ("text",))


def optional(task: tasks.Task) -> list[str]:
    """The example's arguments a request may leave out (instruct's input); the first, which
    a bare text fills, never."""
    return [f for f in task.serve_fields[1:] if f in task.optional]


def requests(task: tasks.Task) -> list[dict]:
    """What the README's example is called on, as its arguments: the task's served example
    (entail's `mnli …` line read into its pair), and a request that fills every field."""
    first = task.serve_row(task.serve_example) if task.serve_row else {fields(task)[0]: task.serve_example}
    return [{f: first[f] for f in fields(task) if f in first}] + ([task.serve_filled] if task.serve_filled else [])


def _prompt_lines(task: tasks.Task, labels: list[str]) -> str:
    """`answer`'s lines that build `prompt` from its arguments, as tuneline fills the task's."""
    if task.chat:
        return (
            "# a user message, or the turns of a conversation that ends with the user's\n"
            '    turns = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages\n'
            "    prompt = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)"
        )
    if not task.serve_fields:
        return "prompt = text"
    fill = ", ".join(f"{f}={f}" for f in task.serve_fields)
    left_out = optional(task)
    if not left_out:
        return f"prompt = {request.prompt_format(task, labels, task.serve_fields)!r}.format({fill})"
    # a template for each set of optional fields given (instruct: with or without an input)
    templates = {}
    for key in itertools.product((True, False), repeat=len(left_out)):
        given = dict(zip(left_out, key))
        templates[key] = request.prompt_format(task, labels, tuple(f for f in task.serve_fields if given.get(f, True)))
    if len(left_out) == 1:
        return (
            f"template = {templates[(True,)]!r} if {left_out[0]} else {templates[(False,)]!r}\n"
            f"    prompt = template.format({fill})"
        )
    which = ", ".join(f"bool({f})" for f in left_out)
    return (
        f"templates = {templates!r}  # by which of {', '.join(left_out)} are given\n"
        f"    prompt = templates[({which})].format({fill})"
    )


def constrained(task: tasks.Task, config: dict) -> bool:
    """The version keeps its answers to the input's words (`evaluate.constrain: words`)."""
    return config.get("constrain") == "words" and task.words is not None


def example(task: tasks.Task, config: dict, model: str) -> str:
    """The README's transformers example for a model logged with serving `config`: it
    defines `answer`; the README then calls it on `requests(task)`."""
    cut = f"text.split({task.stop!r})[0].strip()" if task.stop else "text"
    generate = "out = model.generate(**ids)  # decoding as evaluated: generation_config.json"
    if constrained(task, config):  # the words are those of the served field (Task.words)
        words = fields(task)[0]
        generate = (
            f"# decoding as evaluated (generation_config.json), the answer made of {words}'s words\n"
            "    # (custom_generate/generate.py: tuneline's constraint; leave these four arguments out to decode freely)\n"
            f"    out = model.generate(**ids, custom_generate=MODEL, trust_remote_code=True, tokenizer=tok, words=[{words}])"
        )
    signature = ", ".join(f"{f}: str" + (' = ""' if f in optional(task) else "") for f in fields(task))
    if task.chat:
        signature = "messages: str | list[dict]"
    return EXAMPLE.format(
        model=model,
        signature=signature,
        prompt_lines=_prompt_lines(task, config["labels"]),
        generate_line=generate,
        cut=cut,
    )


def call(request: dict) -> str:
    """How the README calls `answer` on `request`: one argument by position, several by name."""
    if len(request) == 1:
        return f"answer({next(iter(request.values()))!r})"
    return "answer(" + ", ".join(f"{k}={v!r}" for k, v in request.items()) + ")"


def check_dest(dest: Path) -> None:
    """Refuse a destination that holds anything, or whose parent is missing or unwritable
    (the folder is made beside it and renamed into place)."""
    if dest.exists() and not dest.is_dir():
        raise TunelineError(f"'{dest}' is a file, and the export is a folder", "give a new folder's path")
    if dest.exists() and any(dest.iterdir()):
        raise TunelineError(
            f"'{dest}' already exists and is not an empty folder", "give a new folder, or remove that one first"
        )
    if not dest.parent.is_dir():
        raise TunelineError(f"the folder '{dest.parent}' does not exist", f"create it first: mkdir -p {dest.parent}")
    why = unwritable(dest.parent)
    if why:
        raise TunelineError(f"no folder can be made in '{dest.parent}' ({why})", "give a place you can write to")


def check_hub(repo: str) -> None:
    """Before any work: `repo` must be a valid hub repository id, and the hub reachable."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise TunelineError(
            f"--hub '{repo}' is not a hub repository id ({str(e).split(':')[0]})",
            "give NAME or OWNER/NAME, e.g. --hub me/descrambler",
        ) from None
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise TunelineError(
            "--hub needs the network, and the hub is off (HF_HUB_OFFLINE=1)",
            "set HF_HUB_OFFLINE=0 on a machine with network access and log in (HF_TOKEN or `hf auth login`), "
            "or export without --hub and upload the folder later",
        )


def _served(downloaded: Path, label: str) -> tuple[Path, dict]:
    """The HF folder inside a downloaded MLflow model, and its serving settings."""
    from mlflow.models import Model

    flavors = Model.load(str(downloaded)).flavors
    pyfunc = flavors.get("python_function", {})
    if "transformers" in flavors or "model" not in pyfunc.get("artifacts", {}):
        raise TunelineError(
            f"{label} was not registered by this tuneline (it has no merged model folder to export)",
            "register a new version with `tuneline run`, or load this one with mlflow.pyfunc.load_model",
        )
    return downloaded / pyfunc["artifacts"]["model"]["path"], pyfunc["config"]


def _front_matter(params: dict, task: tasks.Task, config: dict) -> str:
    import yaml

    from tuneline.modeling import BUILTIN

    base = params.get("model", {}).get("name", "")
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["tuneline", task.name]}
    if base in HUB_IDS:
        meta["base_model"] = HUB_IDS[base]
    elif base and base not in BUILTIN and "/" in base and not Path(base).exists():
        meta["base_model"] = base  # a hub id
    if method := params.get("train", {}).get("method"):
        meta["tags"].append(method)
    if constrained(task, config):
        meta["tags"].append("custom_generate")  # the hub's tag for a repo with its own decoding
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def readme(version, task: tasks.Task, config: dict, params: dict, code: str) -> str:
    """The exported folder's README.md: hub metadata, how to use it, the version's card."""
    beams = "greedy" if config["num_beams"] == 1 else f"{config['num_beams']} beams"
    cut = f", the answer cut at {task.stop!r}" if task.stop else ""
    words = (
        " Like `tuneline predict` and the served MLflow model, it keeps the answer to the input's words "
        "(`evaluate.constrain: words`): `custom_generate/generate.py` is tuneline's constraint, which `generate` "
        "runs as its own code, hence `trust_remote_code=True`. Without `custom_generate`, `trust_remote_code`, "
        "`tokenizer` and `words` it decodes freely, as `tuneline predict --free` does."
        if constrained(task, config)
        else ""
    )
    card = (version.description or "").lstrip()
    if card.startswith("# "):  # the card's title is this README's
        card = card.split("\n", 1)[1] if "\n" in card else ""
    return (
        _front_matter(params, task, config) + f"\n# {version.name} v{version.version}\n\n"
        f"Exported by `tuneline export` from the MLflow registry (`models:/{version.name}/{version.version}`, "
        f"run `{version.run_id}`). The weights and tokenizer are the merged model as registered"
        + ("; `tuneline_params.json` holds every setting of the run that made it" if params else "")
        + ".\n\n"
        "## Use it with transformers\n\n"
        f"```python\n{code}\n\n" + "".join(f"print({call(r)})\n" for r in requests(task)) + "```\n\n"
        f"It decodes as the version was evaluated ({beams}, at most {config['max_new_tokens']} new tokens: "
        f"`generation_config.json`){cut}. In fp32 it answers as tuneline does (checked on these examples at "
        "export); tuneline decodes under bf16 autocast where the hardware has it (`evaluate.precision`), "
        f"which can flip a near tie.{words}\n\n" + card
    )


def _decode_config(folder: Path, config: dict, tok) -> None:
    """generation_config.json: the version's decoding, for `generate` without arguments.
    An answer ends at the tokenizer's EOS alone, as in tuneline (a base model's config may
    list other end ids), and padding is tuneline's (EOS where the tokenizer has no pad)."""
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    gen |= {
        "do_sample": False,
        "num_beams": int(config["num_beams"]),
        "max_new_tokens": int(config["max_new_tokens"]),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    for sampling in ("temperature", "top_p", "top_k"):  # unused when greedy; transformers warns about them
        gen.pop(sampling, None)
    path.write_text(json.dumps(gen, indent=2) + "\n")


def _chat_template(folder: Path, task: tasks.Task, tok) -> None:
    """A chat model trained on tuneline's default template (its tokenizer had none) gets it
    saved, so that `apply_chat_template` renders its prompts as trained."""
    from tuneline import chat

    if task.chat and not getattr(tok, "chat_template", None):
        (folder / "chat_template.jinja").write_text(chat.DEFAULT_TEMPLATE)


def _custom_generate(folder: Path, task: tasks.Task, config: dict) -> None:
    """A version that keeps its answers to the input's words ships the constraint for
    `generate`: tuneline/constrain.py as it is (torch and transformers alone), whose
    `generate` is transformers' `custom_generate` entry point."""
    from tuneline import constrain

    if constrained(task, config):
        (folder / "custom_generate").mkdir()
        shutil.copyfile(constrain.__file__, folder / "custom_generate" / "generate.py")


def check(folder: Path, task: tasks.Task, config: dict, code: str, tok) -> str:
    """Run the README's example on `folder` for each of `requests(task)` and compare its
    answers with tuneline's own decoding of the same model and requests (fp32; under the
    version's word constraint where it has one), with tuneline's tokenizer `tok` (a chat
    model without a template of its own renders with tuneline's default, as the folder's
    `chat_template.jinja` does). Returns the answer to the first."""
    from tuneline.generation import generate
    from tuneline.serving import Answerer

    scope: dict = {}  # the example's globals: it loads `tok` and `model` from `folder`
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own example, as the README shows it)
    served = Answerer()  # its `prompts` is how the registered model fills the task's prompt
    served.model, served.tok, served.config = scope["model"], tok, config
    said = []
    for asked in requests(task):
        theirs = scope["answer"](**asked)
        served_as = asked if task.serve_fields else asked[fields(task)[0]]  # pretrain's text, chat's turns
        ours = generate(
            served.model,
            served.tok,
            served.prompts([served_as]),
            config["max_new_tokens"],
            1,
            int(config["num_beams"]),
            task.stop,
            constraint=served.words([served_as]) if constrained(task, config) else None,
            show=False,
        )[0]
        if theirs != ours:
            raise TunelineError(
                f"the exported folder, run with plain transformers, answers {theirs!r} to {call(asked)} where "
                f"tuneline answers {ours!r}; nothing was exported",
                "report it with both answers (tuneline export --debug shows where it happened)",
            )
        said.append(theirs)
    return said[0]


def export(version, dest: Path) -> dict:
    """Write `version` (an MLflow ModelVersion) as a Hugging Face folder at `dest`, whole or
    not at all. Returns what was written and the checked example's answer."""
    import mlflow

    from tuneline.modeling import load_tokenizer
    from tuneline.serving import trained_params

    check_dest(dest)
    label = f"{version.name} v{version.version}"
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(work / "mlflow")
            )
        )
        source, config = _served(downloaded, label)
        task = tasks.TASKS[config["task"]]
        folder = work / "hf"
        shutil.copytree(source, folder)
        params = trained_params(folder) or {}
        tok = load_tokenizer(str(folder))
        _decode_config(folder, config, tok)
        _chat_template(folder, task, tok)
        _custom_generate(folder, task, config)
        answer = check(folder, task, config, example(task, config, str(folder)), tok)
        code = example(task, config, str(dest))  # the README names where the folder ends up
        (folder / "README.md").write_text(readme(version, task, config, params, code))
        share_modes(folder)  # MLflow's copy keeps safetensors' 0600
        if dest.exists():
            dest.rmdir()  # empty (check_dest)
        os.replace(folder, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "folder": str(dest),
        "files": sorted(p.name for p in dest.iterdir()),
        "example": task.serve_example,
        "answer": answer,
    }


def push(folder: Path, repo: str, version) -> str:
    """Upload an exported folder to the hub repository `repo` (created private if new), in
    one commit whose README example loads from `repo`; the local folder stays as it is.
    Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    readme = (folder / "README.md").read_text().replace(f"MODEL = {str(folder)!r}", f"MODEL = {repo!r}")
    ops = [CommitOperationAdd(f, readme.encode() if f == "README.md" else str(folder / f)) for f in files]
    api = HfApi()
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        info = api.create_commit(
            repo, ops, commit_message=f"{version.name} v{version.version} from tuneline (run {version.run_id})"
        )
    except Exception as e:  # HfHubHTTPError (auth, a bad name), connection errors
        raise TunelineError(
            f"the upload to the hub repository '{repo}' failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
            f"check the name and your login (HF_TOKEN or `hf auth login`); the folder is exported at {folder}, "
            f"so `hf upload {repo} {folder}` can send it later",
        ) from None
    return str(info.commit_url)
