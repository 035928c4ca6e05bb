"""Which KV-cache layout is fastest for the engine's decode attention on this CPU?

    .venv/bin/python benchmarks/kv_cache.py      # ~1 min; writes results/kv_cache.json

One decode step's attention + cache write for B sequences of ragged lengths, SmolLM2-135M shapes
(9 query heads, 3 KV heads, head_dim 64), times 30 layers, fp32:
  per_sequence  each sequence owns K/V sized prompt + max_tokens (the engine's layout): write the new
                token in place, one SDPA per sequence over its own cache (no copy, no padding);
  paged         a pool of 16-token blocks + a block table (vLLM's layout): gather each sequence's
                blocks into a contiguous [B, kvh, blocks*16, hd] tensor, then one masked batched
                attention (CPU has no fused paged-attention kernel, so the gather is a copy);
  slab          one preallocated [max_seqs, kvh, max_len, hd] tensor, sequences kept in rows 0..B-1:
                one masked batched attention over a view, no copy, but every sequence reserves
                max_len tokens (the padding memory the issue asks to avoid) and attends over the
                longest sequence's length.
Correctness first: all three produce the same output (checked before timing).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_batch import cpu_model, git_commit  # noqa: E402

H, KVH, HD, LAYERS, BLOCK = 9, 3, 64, 30, 16
OUT = Path(__file__).resolve().parent / "results" / "kv_cache.json"


def setup(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(128, 193, (b,), generator=g).tolist()
    cap = max(lens) + 64
    k = [torch.randn(KVH, cap, HD, generator=g) for _ in range(b)]
    v = [torch.randn(KVH, cap, HD, generator=g) for _ in range(b)]
    q = torch.randn(b, H, 1, HD, generator=g)
    new_k, new_v = torch.randn(b, KVH, HD, generator=g), torch.randn(b, KVH, HD, generator=g)
    return lens, k, v, q, new_k, new_v


def per_sequence(lens, k, v, q, nk, nv):
    outs = []
    for i, n in enumerate(lens):
        k[i][:, n] = nk[i]
        v[i][:, n] = nv[i]
        outs.append(F.scaled_dot_product_attention(q[i:i + 1], k[i][None, :, :n + 1], v[i][None, :, :n + 1],
                                                   enable_gqa=True))
    return torch.cat(outs)


def make_paged(lens, k, v):
    b = len(lens)
    nb = (max(lens) + 1 + BLOCK - 1) // BLOCK
    pool_k = torch.zeros(b * nb + 1, KVH, BLOCK, HD)
    pool_v = torch.zeros_like(pool_k)
    table = torch.randperm(b * nb)[: b * nb].view(b, nb) + 1          # scattered blocks, 0 unused
    for i, n in enumerate(lens):
        for j in range(nb):
            lo, hi = j * BLOCK, min((j + 1) * BLOCK, k[i].shape[1])
            pool_k[table[i, j], :, : hi - lo] = k[i][:, lo:hi]
            pool_v[table[i, j], :, : hi - lo] = v[i][:, lo:hi]
    return pool_k, pool_v, table


def paged(lens, pool_k, pool_v, table, q, nk, nv):
    b, nb = table.shape
    pos = torch.tensor(lens)
    blk = table[torch.arange(b), pos // BLOCK]
    pool_k[blk, :, pos % BLOCK] = nk
    pool_v[blk, :, pos % BLOCK] = nv
    kk = pool_k[table].permute(0, 2, 1, 3, 4).reshape(b, KVH, nb * BLOCK, HD)
    vv = pool_v[table].permute(0, 2, 1, 3, 4).reshape(b, KVH, nb * BLOCK, HD)
    mask = torch.arange(nb * BLOCK)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None, None, :], enable_gqa=True)


def make_slab(lens, k, v, max_len):
    b = len(lens)
    sk, sv = torch.zeros(b, KVH, max_len, HD), torch.zeros(b, KVH, max_len, HD)
    for i in range(b):
        sk[i, :, : k[i].shape[1]] = k[i]
        sv[i, :, : v[i].shape[1]] = v[i]
    return sk, sv


def slab(lens, sk, sv, q, nk, nv):
    b = len(lens)
    pos = torch.tensor(lens)
    sk[torch.arange(b), :, pos] = nk
    sv[torch.arange(b), :, pos] = nv
    width = max(lens) + 1
    mask = torch.arange(width)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, sk[:, :, :width], sv[:, :, :width], attn_mask=mask[:, None, None, :],
                                          enable_gqa=True)


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * LAYERS


def main() -> None:
    torch.set_num_threads(2)
    results = {"environment": {"cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
                               "torch": torch.__version__, "dtype": "float32", "git_commit": git_commit(),
                               "shapes": {"heads": H, "kv_heads": KVH, "head_dim": HD, "layers": LAYERS,
                                          "block": BLOCK, "lengths": "uniform 128..192"}},
               "seconds_per_step": {}}
    for b in (8, 32, 64):
        lens, k, v, q, nk, nv = setup(b)
        pk, pv, table = make_paged(lens, k, v)
        sk, sv = make_slab(lens, k, v, 2048)
        ref = per_sequence(lens, [x.clone() for x in k], [x.clone() for x in v], q, nk, nv)
        torch.testing.assert_close(paged(lens, pk.clone(), pv.clone(), table, q, nk, nv), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(slab(lens, sk.clone(), sv.clone(), q, nk, nv), ref, rtol=1e-4, atol=1e-5)
        runs = {"per_sequence": [], "paged": [], "slab": []}
        for _ in range(5):                                                  # alternated A B C
            runs["per_sequence"].append(timed(lambda: per_sequence(lens, k, v, q, nk, nv), 20))
            runs["paged"].append(timed(lambda: paged(lens, pk, pv, table, q, nk, nv), 20))
            runs["slab"].append(timed(lambda: slab(lens, sk, sv, q, nk, nv), 20))
        tokens = sum(lens)
        results["seconds_per_step"][str(b)] = {
            name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in runs.items()}
        results["seconds_per_step"][str(b)]["kv_tokens_reserved"] = {
            "per_sequence": tokens + 64 * b, "paged": (tokens // BLOCK + b) * BLOCK, "slab": 2048 * b}
        print(b, {n: f"{1e3 * statistics.median(t):.1f} ms" for n, t in runs.items()}, flush=True)
    results["seconds_per_step"]["note"] = ("kv_tokens_reserved: tokens of KV memory held (x 46 KiB per token for SmolLM2-135M "
                                           "fp32); slab rows are sized for a 2048-token context")
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
