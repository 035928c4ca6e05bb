"""The systems benchmarks/serve.py drives, all behind one submit() -> ticket interface:

  adapterkit   the continuous-batching engine (serve/engine.py), adapters through its cache;
  peft         the way PEFT users serve many adapters: one PeftModel holding every adapter, a
               worker that takes up to `batch` waiting requests and runs ONE static
               `generate(..., adapter_names=[...])` for them (left padding), then the next batch;
  base         the same engine with no adapter on any request (the physical limit here).

A ticket records created / first-token / finished times (monotonic seconds) and the token count.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(eq=False)
class Ticket:
    adapter: Optional[str]
    prompt: list[int]
    max_tokens: int
    created: float = field(default_factory=time.monotonic)
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    tokens: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    stream: Any = None


def make_adapters(base: Any, root: Path, count: int) -> list[str]:
    """`count` rank-16 LoRAs on q,k,v,o with B != 0 (seeded), saved once under root/a0000...;
    reused when already there. Returns their names."""
    from adapterkit import LoraConfig, create_adapter

    names = [f"a{i:04d}" for i in range(count)]
    cfg = LoraConfig(r=RANK, alpha=2 * RANK, target_modules=TARGETS, init="nonzero")
    for i, name in enumerate(names):
        if not (root / name / "adapter_model.safetensors").exists():
            create_adapter(name, base.model, cfg, seed=i, fingerprint=base.fingerprint,
                           base_name=base.name).save(root / name)
    return names


def subset_root(full: Path, names: list[str], dest: Path) -> Path:
    """A root folder serving only `names`: hard links to the files (no copy, no symlink)."""
    for name in names:
        d = dest / name
        if d.exists():
            continue
        tmp = dest / f".{name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for f in (full / name).iterdir():
            os.link(f, tmp / f.name)
        tmp.rename(d)
    return dest


class EngineSystem:
    """adapterkit's engine (or the bare base through it: adapters=None on every request)."""

    def __init__(self, base_path: str, root: Optional[Path], *, max_batch: int, max_loaded: int,
                 ram_cache_mb: float, use_adapters: bool = True, warm: tuple[str, ...] = (),
                 attention: str = "batched") -> None:
        """warm: adapters attached before the clock starts (a warm-cache run); none: cold. attention: the
        engine's KV layout (EngineConfig.attention)."""
        from adapterkit.serve.engine import Engine, EngineConfig

        self.use_adapters = use_adapters
        self.engine = Engine.build(base_path, adapter_dirs=[root] if root else [],
                                   config=EngineConfig(max_batch=max_batch, max_queue=100000,
                                                       max_prefill_tokens=1024, kv_cache_mb=4096,
                                                       attention=attention),
                                   max_loaded_adapters=max_loaded, ram_cache_mb=ram_cache_mb).start()
        for name in warm:
            self.engine.cache.acquire(name).release()

    def submit(self, t: Ticket) -> None:
        from adapterkit.serve.requests import GenerationRequest, SamplingParams

        params = SamplingParams(max_tokens=t.max_tokens, temperature=0.0, ignore_eos=True)
        s = self.engine.submit(GenerationRequest(list(t.prompt), t.adapter if self.use_adapters else None, params))
        s.created = t.created
        t.stream = s

    def collect(self, t: Ticket) -> None:
        s = t.stream
        s.result(timeout=3600)
        t.first_token_at, t.finished_at, t.tokens = s.first_token_at, s.finished_at, len(s.token_ids)

    def close(self) -> dict[str, Any]:
        stats = self.engine.cache.stats()
        self.engine.stop(drain=False)
        self.engine.cache.close()
        return stats


class _Timing:
    """StoppingCriteria that never stops: records when each generated token of the batch is ready."""

    def __init__(self) -> None:
        self.first: Optional[float] = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.first is None:
            self.first = time.monotonic()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class PeftStaticSystem:
    """PEFT mixed-batch generate over static batches; adapters=None: the plain HF model (bare base)."""

    _models: dict[Any, Any] = {}      # (base, root) -> (model, pad): loading 64 PEFT adapters takes ~40 s

    def __init__(self, base_path: str, root: Optional[Path], names: list[str], *, batch: int) -> None:
        key = (base_path, root)
        if key not in self._models:
            from adapterkit.core.base import load_base

            b = load_base(base_path)
            pad = b.tokenizer.pad_token_id if b.tokenizer.pad_token_id is not None else b.tokenizer.eos_token_id
            model = b.model.eval()
            if root is not None:
                import peft

                model = peft.PeftModel.from_pretrained(model, str(root / names[0]), adapter_name=names[0])
                for name in names[1:]:
                    model.load_adapter(str(root / name), adapter_name=name)
                model.eval()
            self._models[key] = (model, pad)
        self.model, self.pad = self._models[key]
        self.use_adapters = root is not None
        self.batch = batch
        self.queue: "queue.SimpleQueue[Optional[Ticket]]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, t: Ticket) -> None:
        self.queue.put(t)

    def collect(self, t: Ticket) -> None:
        t.done.wait()

    def _loop(self) -> None:
        from transformers import StoppingCriteriaList

        torch.set_grad_enabled(False)
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            width = max(len(t.prompt) for t in batch)
            ids = torch.full((len(batch), width), self.pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, t in enumerate(batch):                       # left padding, as generate wants
                ids[i, width - len(t.prompt):] = torch.tensor(t.prompt)
                mask[i, width - len(t.prompt):] = 1
            n = max(t.max_tokens for t in batch)
            timing = _Timing()
            kwargs = dict(adapter_names=[t.adapter for t in batch]) if self.use_adapters else {}
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=self.pad,
                                      stopping_criteria=StoppingCriteriaList([timing]), **kwargs)
            end = time.monotonic()
            for t in batch:
                t.first_token_at, t.finished_at = timing.first, end
                t.tokens = out.shape[1] - width
                t.done.set()

    def close(self) -> dict[str, Any]:
        self.queue.put(None)
        self.thread.join()
        return {}
