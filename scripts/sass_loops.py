#!/usr/bin/env python3
"""What one trip of each kernel's main loop issues, read from `cuobjdump --dump-sass` output.

A warp scheduler issues one instruction per cycle, and an SM's four schedulers share its tensor
cores. A FlashAttention-2 loop whose trip issues many instructions per mma.sync (HMMA) is bound by
issue, not by the tensor cores; one that issues many ldmatrix (LDSM, 512 bytes each) per HMMA is
bound by shared memory. Without a GPU these counts are the measure of a change to the kernels.

The main loop is the backward branch spanning the most HMMA. Its trip is counted along the
shortest path (no branch into a rarely-taken part such as the causal mask or the next tile's
copies, but also none into a guarded store: ptxas branches around each of the backward's dQ
additions, which the shortest path therefore leaves out) and the longest; predicated instructions count, since they are issued either way, and an
inner loop counts once (it is also shown on a line of its own: a kernel that walks its query tile
in sub-tiles runs it several times per trip).

    python3 scripts/sass_loops.py kernels.sass
"""
import collections
import re
import sys

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")


def parse(body):
    """(address, opcode, predicated, branch target or None) for each instruction."""
    out = []
    for m in INSTR.finditer(body):
        target = None
        if m.group(3) == "BRA":
            t = re.search(r"0x([0-9a-f]+)", m.group(5))
            target = int(t.group(1), 16) if t else None
        out.append((int(m.group(1), 16), m.group(3), bool(m.group(2)), target))
    return out


def loops_with_hmma(ins):
    """(first, last, HMMA count) of every loop (back edge) that contains an HMMA."""
    at = {a: k for k, (a, *_rest) in enumerate(ins)}
    found = []
    for k, (a, op, _pred, t) in enumerate(ins):
        if op == "BRA" and t is not None and t < a and t in at:
            hmma = sum(1 for _a, o, *_r in ins[at[t]:k + 1] if o == "HMMA")
            if hmma:
                found.append((at[t], k, hmma))
    return found


def main_loop(ins):
    """(first, last) instruction index of the loop whose back edge spans the most HMMA."""
    found = loops_with_hmma(ins)
    if not found:
        return None
    first, last, _ = max(found, key=lambda f: f[2])
    return first, last


def inner_loops(ins, first, last):
    """The loops with HMMA strictly inside the main loop (a kernel's sub-tile loop, say)."""
    return [(f, l) for f, l, _ in loops_with_hmma(ins) if first <= f and l < last]


def trips(ins, first, last):
    """Counters of the opcodes along the shortest and the longest path from `first` to `last`."""
    at = {a: k for k, (a, *_rest) in enumerate(ins)}
    shortest, longest = {}, {}
    for k in range(last, first - 1, -1):
        a, op, pred, t = ins[k]
        here = collections.Counter({op: 1})
        if k == last:
            shortest[k] = longest[k] = here
            continue
        succ = []
        if op != "EXIT" and not (op == "BRA" and not pred):
            succ.append(k + 1)
        if op == "BRA" and t is not None and a < t <= ins[last][0]:
            succ.append(at[t])
        succ = [s for s in succ if s in shortest]
        if succ:
            shortest[k] = here + min((shortest[s] for s in succ), key=lambda c: c.total())
            longest[k] = here + max((longest[s] for s in succ), key=lambda c: c.total())
    return shortest[first], longest[first]


def main():
    text = open(sys.argv[1]).read()
    parts = re.split(r"\n\s*Function : (\S+)", text)
    rows = []
    for name, body in zip(parts[1::2], parts[2::2]):
        ins = parse(body)
        loop = main_loop(ins)
        if loop is None:
            continue
        short, long = trips(ins, *loop)
        inner = [trips(ins, f, l)[0] for f, l in inner_loops(ins, *loop)]
        rows.append((name, short, long, inner))
    print(f"{'kernel':26} {'trip':>11} {'HMMA':>5} {'LDSM':>5} {'MUFU':>5} {'per HMMA':>9}  longest trip")
    line = "{:26} {:5} instr {:5} {:5} {:5} {:9.2f}"
    for name, short, long, inner in sorted(rows):
        h = max(short["HMMA"], 1)
        print(line.format(name, short.total(), short["HMMA"], short["LDSM"], short["MUFU"], short.total() / h)
              + f"  {long.total():5} ({long.total() / max(long['HMMA'], 1):.2f} per HMMA)")
        # A loop inside the trip (query sub-tiles) is counted once above; it runs more often.
        for c in inner:
            print(line.format("  of which, per inner trip", c.total(), c["HMMA"], c["LDSM"], c["MUFU"],
                              c.total() / max(c["HMMA"], 1)))


if __name__ == "__main__":
    main()
