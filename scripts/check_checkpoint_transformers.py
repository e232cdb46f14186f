#!/usr/bin/env python3
"""Loads a kiln checkpoint (or any HF model dir) with transformers and compares transformers'
float32 log-probabilities of a text with `kiln score` on the same directory.

    python scripts/check_checkpoint_transformers.py runs/demo/checkpoints/step-00000400 [TEXT]

Needs torch and transformers (4.x or 5.x); run from the repository root after `cargo build --release`.
"""
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_TEXT = "Once upon a time, there was a little dog named Max.\ndef add(a, b):\n    return a + b\n"


def main():
    ckpt = sys.argv[1]
    text = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_TEXT
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(text).input_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    ref = [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    out = subprocess.run(["./target/release/kiln", "score", "--model", ckpt, "--text", text],
                         capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["ids"] == ids, f"tokenization differs: {got['ids'][:10]} vs {ids[:10]}"
    worst = max(abs(a - b) for a, b in zip(got["logprobs"], ref))
    print(f"{ckpt}: {len(ids)} tokens, max |kiln - transformers| log-prob = {worst:.2e}")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
