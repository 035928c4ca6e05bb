"""Which KV-cache layout is fastest for the engine's decode attention on this CPU?

    .venv/bin/python benchmarks/kv_cache.py      # ~1 min; writes results/kv_cache.json

One decode step's attention + cache write for B sequences of ragged lengths, SmolLM2-135M shapes
(9 query heads, 3 KV heads, head_dim 64), times 30 layers, fp32:
  per_sequence  each sequence owns K/V sized prompt + max_tokens (the engine's reference layout,
                EngineConfig(attention="per-sequence")): write the new token in place, one SDPA per
                sequence over its own cache (no copy, no padding); timed through FlatDecoder's own code;
  arena         the engine's default (serve/kv_arena.py): sequences in capacity classes (<= 1.1x their
                need), chunks of 1, 2, 4, 8, 16 slots; one masked SDPA per chunk over a view (no copy);
                timed through FlatDecoder's own code (the step's plan included);
  paged         a pool of 16-token blocks + a block table (vLLM's layout): gather each sequence's
                blocks into a contiguous [B, kvh, blocks*16, hd] tensor, then one masked batched
                attention (CPU has no fused paged-attention kernel, so the gather is a copy);
  slab          one preallocated [max_seqs, kvh, max_len, hd] tensor, sequences kept in rows 0..B-1:
                one masked batched attention over a view, no copy, but every sequence reserves
                max_len tokens (the padding memory the issue asks to avoid) and attends over the
                longest sequence's length.
paged and slab time one layer's tensors 30 times (cache-warm, so optimistic); the engine's layouts touch
each layer's own memory, as a real step does. Correctness first: all produce the same output (checked
before timing). A second workload, "mixed",
has needs spread over many classes (prompts 32..1024 + 64 new tokens): the arena then batches less.
kv_tokens_reserved: what each layout holds (the arena: every allocated slot x its class capacity).
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

from adapterkit.serve.forward import FlatDecoder, Segment, _decode_groups  # noqa: E402

H, KVH, HD, LAYERS, BLOCK = 9, 3, 64, 30, 16
OUT = Path(__file__).resolve().parent / "results" / "kv_cache.json"


def setup(b: int, seed: int = 0, mixed: bool = False):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(32, 1025, (b,), generator=g).tolist() if mixed else torch.randint(128, 193, (b,), generator=g).tolist()
    cap = max(lens) + 64
    k = [torch.randn(KVH, cap, HD, generator=g) for _ in range(b)]
    v = [torch.randn(KVH, cap, HD, generator=g) for _ in range(b)]
    q = torch.randn(b, H, 1, HD, generator=g)
    new_k, new_v = torch.randn(b, KVH, HD, generator=g), torch.randn(b, KVH, HD, generator=g)
    return lens, k, v, q, new_k, new_v


def decoder() -> FlatDecoder:
    """A FlatDecoder with SmolLM2-135M's attention shapes (tiny MLP and vocabulary: only attention is timed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=H * HD, num_attention_heads=H, num_key_value_heads=KVH, num_hidden_layers=LAYERS,
                      intermediate_size=8, vocab_size=16, max_position_embeddings=8192)
    return FlatDecoder(LlamaForCausalLM(cfg).eval())


def engine_caches(fd: FlatDecoder, lens, k, v, needs, arena: bool):
    """The engine's caches for these sequences (SeqCache each, or ArenaCache slots), filled with k, v."""
    store = fd.new_arena() if arena else None
    caches = [store.allocate(n) if arena else fd.new_cache(n) for n in needs]
    for c, n, kk, vv in zip(caches, lens, k, v):
        c.k[:, :, :n] = kk[:, :n]
        c.v[:, :, :n] = vv[:, :n]
        c.length = n
    return store, [Segment(c, i, 1) for i, c in enumerate(caches)]


def engine_step(fd: FlatDecoder, segs, q, nk, nv) -> torch.Tensor:
    """One decode step's attention over all layers, as FlatDecoder.hidden runs it (the plan, then per layer
    the arena's chunk calls and the per-sequence calls). q [b, heads, hd], nk, nv [b, kvh, hd]."""
    groups, single = _decode_groups(segs, q.device)
    out = torch.empty(q.shape[0], H * HD)
    for layer in range(LAYERS):
        for g in groups:
            fd._attend_group(layer, q, nk, nv, g, out)
        fd._attend(layer, q, nk, nv, single, out)
    return out


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


def timed(fn, reps: int, per_step: bool = False) -> float:
    """Seconds per decode step: fn is one layer's attention (x LAYERS) or, per_step, the whole step."""
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * (1 if per_step else LAYERS)


def main() -> None:
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    fd = decoder()
    results = {"environment": {"cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
                               "torch": torch.__version__, "dtype": "float32", "git_commit": git_commit(),
                               "shapes": {"heads": H, "kv_heads": KVH, "head_dim": HD, "layers": LAYERS,
                                          "block": BLOCK, "lengths": "uniform 128..192; mixed: 32..1024"}},
               "seconds_per_step": {}}
    for workload, b in (("uniform", 8), ("uniform", 32), ("uniform", 64), ("mixed", 64)):
        lens, k, v, q, nk, nv = setup(b, mixed=workload == "mixed")
        needs = [n + 64 for n in lens]
        eq, enk, env_ = q[:, :, 0], nk, nv                              # the engine's q [b, heads, hd]
        _, per_segs = engine_caches(fd, lens, k, v, needs, arena=False)
        arena, arena_segs = engine_caches(fd, lens, k, v, needs, arena=True)
        systems = {"per_sequence": lambda: engine_step(fd, per_segs, eq, enk, env_),
                   "arena": lambda: engine_step(fd, arena_segs, eq, enk, env_)}
        ref = systems["per_sequence"]()
        torch.testing.assert_close(systems["arena"](), ref, rtol=1e-4, atol=1e-5)
        if workload == "uniform":                                       # the copy-based layouts, for context
            pk, pv, table = make_paged(lens, k, v)
            sk, sv = make_slab(lens, k, v, 2048)
            flat = lambda o: o.reshape(b, -1)                           # noqa: E731  [b, heads*hd]
            torch.testing.assert_close(flat(paged(lens, pk.clone(), pv.clone(), table, q, nk, nv)), ref,
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(flat(slab(lens, sk.clone(), sv.clone(), q, nk, nv)), ref, rtol=1e-4, atol=1e-5)
            systems["paged"] = lambda: paged(lens, pk, pv, table, q, nk, nv)
            systems["slab"] = lambda: slab(lens, sk, sv, q, nk, nv)
        runs: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(5):                                              # alternated A B C D
            for name, fn in systems.items():
                runs[name].append(timed(fn, 3 if name in ("per_sequence", "arena") else 20,
                                        per_step=name in ("per_sequence", "arena")))
        exact = sum(needs)
        key = f"{workload}-{b}" if workload != "uniform" else str(b)
        row = {name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in runs.items()}
        row["kv_tokens_reserved"] = {"exact_need": exact, "per_sequence": exact, "arena": arena.reserved_tokens,
                                     "paged": (sum(lens) // BLOCK + b) * BLOCK, "slab": 2048 * b}
        row["arena_layout"] = arena.stats()
        row["arena_vs_per_sequence"] = statistics.median(runs["arena"]) / statistics.median(runs["per_sequence"])
        results["seconds_per_step"][key] = row
        print(key, {n: f"{1e3 * statistics.median(t):.1f} ms" for n, t in runs.items()},
              f"arena reserves {arena.reserved_tokens / exact:.3f}x the exact need, {arena.stats()}", flush=True)
    results["seconds_per_step"]["note"] = ("kv_tokens_reserved: tokens of KV memory held (x 46 KiB per token for SmolLM2-135M "
                                           "fp32); slab rows are sized for a 2048-token context")
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
