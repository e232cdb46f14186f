#!/usr/bin/env python3
"""How much a causal FlashAttention-2 launch loses to its tail, by block order (no GPU needed).

Under the causal mask a forward block of query tile qb visits qb + 1 key tiles, and a backward block
of key tile kb visits (n - kb) query tiles of each of its group's heads, so block durations differ
up to n-fold. The GPU hands blocks to free slots in launch order; this replays that greedy dispatch
for TinyLlama's attention (batch 8, seq 2048, 32 heads / 4 KV heads, 64-row tiles) on an H100/H200
(132 SMs; 4 forward blocks of 64 queries or 2 of 128, and 2 backward blocks of 64 or 128 keys,
resident per SM by ptxas' register counts and shared memory) and prints each order's finishing time
against the ideal (total work / slots). kernels/flash_attn.cu launches
heaviest first; the old grids put the tile index in the fastest dimension.

    python3 bench/attention_schedule.py
"""
import heapq

BATCH, HEADS, KV_HEADS, SEQ, TILE, SMS = 8, 32, 4, 2048, 64, 132


def finish(durations, slots):
    free = [0.0] * slots
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def report(name, old, new, slots):
    ideal = sum(old) / slots
    print(f"{name}: tile index fastest {finish(old, slots) / ideal:.3f}x the ideal, "
          f"heaviest first {finish(new, slots) / ideal:.3f}x")


n = SEQ // TILE
fwd_old = [qb + 1 for _b in range(BATCH) for _h in range(HEADS) for qb in range(n)]
fwd_new = [qb + 1 for qb in reversed(range(n)) for _b in range(BATCH) for _h in range(HEADS)]
report("forward (4 blocks/SM)", fwd_old, fwd_new, 4 * SMS)

# The two-m-tile forward: 128-query blocks, two per SM; block qb visits 2·qb + 2 key tiles with
# twice a 64-query block's rows.
fwd2_old = [2 * (2 * qb + 2) for _b in range(BATCH) for _h in range(HEADS) for qb in range(n // 2)]
fwd2_new = [2 * (2 * qb + 2) for qb in reversed(range(n // 2)) for _b in range(BATCH) for _h in range(HEADS)]
report("forward (2 blocks/SM of 128 queries)", fwd2_old, fwd2_new, 2 * SMS)

group = HEADS // KV_HEADS


def backward(tiles):
    """Blocks of `tiles` 64-key tiles: block kb visits the query tiles from its first key on, each
    costing `tiles` times a 64-key block's; in launch order, tile index fastest then heaviest first."""
    cost = [(n - tiles * kb) * group * tiles for kb in range(n // tiles)]
    old = [c for _b in range(BATCH) for _h in range(KV_HEADS) for c in cost]
    new = [c for c in cost for _b in range(BATCH) for _h in range(KV_HEADS)]
    return old, new


report("backward (2 blocks/SM)", *backward(1), 2 * SMS)
# The two-m-tile backward: 128-key blocks, two per SM.
report("backward (2 blocks/SM of 128 keys)", *backward(2), 2 * SMS)
