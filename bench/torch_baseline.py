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


def timed(fn, warmup: int, iters: int) -> float:
    """Seconds per call of `fn` after `warmup` calls, with the GPU drained on both ends."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def tinyllama_step(seq: int, micro_batch: int, steps: int, warmup: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=seq,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    model.gradient_checkpointing_disable()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.nn.attention.sdpa_kernel(
            torch.nn.attention.SDPBackend.FLASH_ATTENTION
        ):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed(step, warmup, steps)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = micro_batch * seq
    # 6N per token for the weights plus attention's 6·n_layer·seq·d_model (causal half of 12).
    flops_per_token = 6 * n_params + 6 * cfg.num_hidden_layers * seq * cfg.hidden_size
    return {
        "bench": "torch_tinyllama_step",
        "seq": seq,
        "micro_batch": micro_batch,
        "step_ms": secs * 1e3,
        "tokens_per_s": tokens / secs,
        "tflops": flops_per_token * tokens / secs / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "params": n_params,
    }


def sdpa_flash(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, iters: int) -> dict:
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-model", action="store_true")
    a = ap.parse_args()
    print(json.dumps({"bench": "device", "name": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
    for hd in (64, 128):
        heads = 2048 // hd
        print(json.dumps(sdpa_flash(4, 2048, heads, max(1, heads // 8), hd, 20)), flush=True)
    if not a.skip_model:
        print(json.dumps(tinyllama_step(a.seq, a.micro_batch, a.steps, a.warmup)), flush=True)


if __name__ == "__main__":
    main()
