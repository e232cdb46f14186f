#!/usr/bin/env python3
"""The PyTorch baseline kiln's CUDA engine is measured against, on the same card in the same run
(scripts/gpu-check.sh): one TinyLlama-1.1B training step the way a user would write it -
transformers' LlamaForCausalLM, bf16 autocast, scaled_dot_product_attention on the flash backend,
fused AdamW - and FlashAttention-2 forward+backward TFLOP/s through torch SDPA's flash backend.

Prints one JSON object per line: {"bench": ..., ...}. Needs torch with CUDA and transformers.
"""
import argparse
import json
import time

import torch

# "cuda" for the figures; "cpu" only checks the script end to end on a machine without a GPU
# (`--device cpu --layers 1 --seq 64 --micro-batch 1 --steps 1 --warmup 0`).
DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, iters: int) -> float:
    """Seconds per call of `fn` after `warmup` calls, with the GPU drained on both ends."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def tinyllama_step(seq: int, micro_batch: int, steps: int, warmup: int, layers: int) -> dict:
    torch.manual_seed(0)
    shape = dict(vocab=32000, d=2048, ff=5632, layers=layers, heads=32, kv_heads=4)
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        # Without transformers (no network on the GPU machines to fetch it): the same model in
        # plain PyTorch, checked against transformers' loss by `python3 bench/torch_llama.py`.
        from torch_llama import Llama

        model, which = Llama(**shape).to(DEV), "plain PyTorch Llama (transformers not installed)"
        forward = model
    else:
        cfg = LlamaConfig(
            vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=shape["ff"],
            num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=seq, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        # Gradient checkpointing is off unless asked for, as TinyLlama trained.
        model, which = LlamaForCausalLM(cfg).to(DEV), f"transformers {transformers.__version__} LlamaForCausalLM"

        def forward(ids):
            return model(input_ids=ids, labels=ids).loss

    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, shape["vocab"], (micro_batch, seq), device=DEV)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16), torch.nn.attention.sdpa_kernel(
            torch.nn.attention.SDPBackend.FLASH_ATTENTION
        ):
            loss = forward(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed(step, warmup, steps)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = micro_batch * seq
    # 6N per token for the weights plus attention's 6·n_layer·seq·d_model (causal half of 12).
    flops_per_token = 6 * n_params + 6 * layers * seq * shape["d"]
    return {
        "bench": "torch_tinyllama_step",
        "seq": seq,
        "micro_batch": micro_batch,
        "step_ms": secs * 1e3,
        "tokens_per_s": tokens / secs,
        "tflops": flops_per_token * tokens / secs / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan"),
        "params": n_params,
        "model": which,
    }


def sdpa_flash(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, iters: int) -> dict:
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, head_dim, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(batch, heads, seq, head_dim, device=DEV, dtype=torch.bfloat16)

    def run():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
        o.backward(dout)

    secs = timed(run, 3, iters)
    # FA2 paper's count: forward 4·b·h·s²·d/2 (causal), backward 2.5× the forward.
    fwd = 4 * batch * heads * seq * seq * head_dim / 2
    return {
        "bench": "torch_sdpa_flash_fwd_bwd",
        "batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "ms": secs * 1e3,
        "tflops": 3.5 * fwd / secs / 1e12,
    }


def summary_row(d: dict) -> list:
    """The [label, figure] pair scripts/gpu-check.sh prints in its table for this result."""
    if d["bench"] == "torch_sdpa_flash_fwd_bwd":
        return [f"torch sdpa flash hd{d['head_dim']}", f"{d['tflops']:.0f} TFLOP/s fwd+bwd"]
    if d["bench"] == "torch_tinyllama_step":
        plain = "" if d["model"].startswith("transformers") else " (plain PyTorch model)"
        return ["torch TinyLlama-1.1B step",
                f"{d['tokens_per_s']:.0f} tokens/s, {d['tflops']:.0f} TFLOP/s, peak {d['peak_gib']:.1f} GiB{plain}"]
    return [f"torch {d['what']}", f"FAILED: {d['error'][:120]}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=22, help="TinyLlama has 22")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    try:
        name = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    except Exception as e:  # noqa: BLE001 - no usable GPU: one reported line, not a traceback
        print(json.dumps({"bench": "error", "what": "device", "error": f"{type(e).__name__}: {e}"[:300],
                          "row": ["torch baseline", f"FAILED: no GPU for torch ({type(e).__name__})"]}), flush=True)
        return 1
    print(json.dumps({"bench": "device", "name": name, "torch": torch.__version__}), flush=True)
    failed = False
    # Each figure on its own: one that fails (an SDPA backend this torch lacks, out of memory) is
    # reported as a line of its own and the others are still measured.
    runs = [(f"torch_sdpa_flash_fwd_bwd hd{hd}", lambda hd=hd: sdpa_flash(4, 2048, 2048 // hd, max(1, 2048 // hd // 8), hd, 20))
            for hd in (64, 128)]
    if not a.skip_model:
        runs.append(("torch_tinyllama_step", lambda: tinyllama_step(a.seq, a.micro_batch, a.steps, a.warmup, a.layers)))
    for name, run in runs:
        try:
            out = run()
        except Exception as e:  # noqa: BLE001 - any failure becomes a reported line
            failed = True
            out = {"bench": "error", "what": name, "error": f"{type(e).__name__}: {e}"[:300]}
            if DEV == "cuda":
                torch.cuda.empty_cache()
        out["row"] = summary_row(out)
        print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
