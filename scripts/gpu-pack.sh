#!/usr/bin/env bash
# Builds, here, everything scripts/gpu-check.sh runs on a GPU machine, and puts stripped copies in
# target/gpu/ (small enough to carry: the release binaries keep line tables and are ~100 MB).
#
#   scripts/gpu-pack.sh     # then carry target/gpu to the GPU machine and run scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
out=target/gpu
rm -rf "$out" && mkdir -p "$out"
strip -o "$out/kiln" target/release/kiln
# The test binaries' paths come from cargo itself, not from guessing at hashes.
cargo test --release --locked --no-run --test kernels --test gpu --test gpu_model --test gpu_fsdp --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do strip -o "$out/$name" "$exe"; done
for t in kiln kernels gpu gpu_model gpu_fsdp; do
  [ -x "$out/$t" ] || { echo "gpu-pack: $out/$t was not built" >&2; exit 1; }
done
du -sh "$out"/*
echo "carry: $out (total $(du -sh "$out" | cut -f1))"
