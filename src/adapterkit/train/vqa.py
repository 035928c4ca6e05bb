"""Vision-language adapters in the VL-Adapter style (Sung et al. 2022), trained and scored end to end.

A VL adapter = an image projector (vision/projector.py: the frozen image base's pooled feature map ->
n image tokens in the language model's embedding space) + an adapter of the language model (LoRA by
default), trained together on question -> answer chats whose user turn starts with the image. The
image base and the language model stay frozen. `freeze_lm=True` trains the projector alone (the
language model's adapter stays at B = 0: the bare base), VL-Adapter's lower bound.

The image base runs once per distinct image before training (its features do not change: it is frozen),
so a step costs only the language model's forward and backward. With `image_adapter=True` (VL-Adapter's
option) a LoRA on the image base's default sites trains too; then the image base runs in every step
(ImageSide) and the adapter is saved inside the projector (vision/projector.py).
Scoring: greedy decoding of a few tokens, exact match of the answer (case and surrounding space ignored),
overall and per question type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core.adapter import Adapter
from ..core.base import Base
from ..core.generate import pad_id
from ..core.runtime import AdapterRuntime
from ..errors import ConfigError
from ..store import AdapterStore
from ..vision.images import image_pixels
from ..vision.projector import ImageProjector, grid_features
from ..vision.vl_prompt import encode_vqa
from .causal_lm import IGNORE
from .defaults import selection_rows
from .fit import finish, fit, method_info, run_lock, start_run
from .progress import RowProgress
from .trainer import TrainConfig, dist_rank_world

DEFAULT_GRID = 2
# The language model's adapter sits on every Linear of each decoder layer (attention and MLP), as VL-Adapter
# puts one after both: the image tokens must steer what the MLPs write, not only where attention looks.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_NORM = False          # standardise the image features before the projector (benchmarks/vision_vqa.py sweep)


@dataclass(frozen=True)
class VQARow:
    input_ids: list[int]
    labels: list[int]              # IGNORE on the prompt (and the image positions)
    slots: list[int]               # positions of the image tokens
    image: Any                     # key into the feature table (image_key)


def image_key(image: Any) -> Any:
    """The feature table's key of an image: its path, or the object's identity (a PIL image is unhashable)."""
    return str(image) if isinstance(image, (str, Path)) else id(image)


class ImageSide:
    """The image base with a trainable adapter on it: grid features of a pixel batch, differentiable in the
    adapter's tensors (the image base stays in eval mode: its BatchNorm statistics never change)."""

    def __init__(self, image_base: Base, adapter: Adapter, grid: int) -> None:
        from ..core.runtime import AdapterRuntime

        self.base, self.adapter, self.grid = image_base, adapter, grid
        kinds = adapter.method.tensor_kinds(adapter.config)
        for parts in adapter.tensors.values():
            for k, t in parts.items():
                parts[k] = t.to(image_base.device, torch.float32)
        self.params = [t.requires_grad_(True) for parts in adapter.tensors.values() for k, t in parts.items()
                       if kinds[k].trainable]
        self.rt = AdapterRuntime.from_base(image_base)
        self.rt.add(adapter)
        self.rt.activate(adapter.name)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return grid_features(self.base.model, pixel_values, self.grid)

    def freeze(self) -> Adapter:
        """Training is over: the adapter's tensors frozen, re-attached (fast stacks re-copied); returns it."""
        for p in self.params:
            p.requires_grad_(False)
        self.rt.deactivate()
        self.rt.remove(self.adapter.name)
        self.rt.add(self.adapter)
        self.rt.activate(self.adapter.name)
        return self.adapter

    def close(self) -> None:
        """Detach the adapter: the image base's modules lose this runtime's hooks (it is the bare base again)."""
        self.rt.deactivate()
        if self.adapter.name in self.rt.adapters:
            self.rt.remove(self.adapter.name)


@torch.no_grad()
def feature_table(image_base: Base, images: Sequence[Any], grid: int, batch_size: int = 32,
                  progress: bool = False, side: ImageSide | None = None) -> dict[Any, torch.Tensor]:
    """{image_key(image): its grid features [grid*grid, C] float32 on the host}, one image-base forward per
    distinct image (images: paths, or anything image_pixels reads); through `side`'s adapter when given."""
    model, spec = image_base.model, image_base.processor
    distinct = list({image_key(im): im for im in images}.values())
    out: dict[Any, torch.Tensor] = {}
    model.eval()
    with RowProgress(len(distinct), progress) as bar:
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start:start + batch_size]
            px = torch.stack([image_pixels(im, spec, f"image {im!r}") for im in chunk]).to(image_base.device)
            feats = (side(px) if side is not None else grid_features(model, px, grid)).cpu()
            out.update(zip(map(image_key, chunk), feats))
            bar.advance(len(chunk))
    return out


def encode_rows(tokenizer: Any, examples: Sequence[Any], n_tokens: int, max_length: int) -> list[VQARow]:
    placeholder = pad_id(tokenizer)
    rows = []
    for e in examples:
        prompt, answer = encode_vqa(tokenizer, e.question, e.answer, n_tokens, placeholder)
        ids = prompt.ids + answer
        if len(ids) > max_length:
            raise ConfigError(f"example {e.id}: {len(ids)} tokens with the image is over max_length {max_length}; "
                              "raise --max-length")
        rows.append(VQARow(ids, [IGNORE] * len(prompt.ids) + answer, prompt.slots, image_key(e.image)))
    return rows


def vqa_collate(features: dict[Any, torch.Tensor] | None, pad: int, images: dict[Any, Any] | None = None,
                spec: Any = None) -> Callable[[list[VQARow]], dict[str, torch.Tensor]]:
    """Padded ids, mask and labels, the image slots, and each row's image features (a feature table) or, with
    an image adapter training (features None), its preprocessed pixels (images: key -> image; spec: the image
    base's preprocessing)."""
    def collate(batch: list[VQARow]) -> dict[str, torch.Tensor]:
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r.input_ids)
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "image_slots": torch.tensor([r.slots for r in batch])}                   # [B, n]
        if features is not None:
            out["image_features"] = torch.stack([features[r.image] for r in batch])     # [B, n, C]
        else:
            out["pixel_values"] = torch.stack([image_pixels(images[r.image], spec) for r in batch])   # [B, 3, H, W]
        return out
    return collate


def image_embeds(model: torch.nn.Module, projector: ImageProjector, input_ids: torch.Tensor,
                 features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The prompt's input embeddings [B, T, d] with the image positions `slots` [B, n] holding the
    projector's image tokens of `features` [B, n, C] (differentiable in the projector)."""
    embeds = model.get_input_embeddings()(input_ids)
    tokens = projector.tokens(features).to(embeds.dtype)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(slots)
    return embeds.index_put((rows, slots), tokens)


class VQALoss:
    """The answer tokens' cross-entropy with the image tokens in place."""

    def __init__(self, projector: ImageProjector, side: ImageSide | None = None) -> None:
        self.projector, self.side = projector, side

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = self.side(batch["pixel_values"]) if "pixel_values" in batch else batch["image_features"]
        embeds = image_embeds(model, self.projector, batch["input_ids"], feats, batch["image_slots"])
        return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@torch.no_grad()
def answer(rt: AdapterRuntime, name: str | None, projector: ImageProjector, features: torch.Tensor,
           questions: Sequence[str], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers of adapter `name` (None: the bare base) to each question about its image's features
    [B, n, C], decoded and stripped."""
    tok = rt.tokenizer
    pad = pad_id(tok)
    prompts = [encode_vqa(tok, q, None, projector.n_tokens, pad)[0] for q in questions]
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    slots = torch.empty(len(prompts), projector.n_tokens, dtype=torch.long)
    for i, p in enumerate(prompts):                     # left padding: every prompt ends where generation starts
        off = width - len(p.ids)
        ids[i, off:], mask[i, off:] = torch.tensor(p.ids), 1
        slots[i] = torch.tensor(p.slots) + off
    dev = rt.device
    ids, mask, slots = ids.to(dev), mask.to(dev), slots.to(dev)
    # a batch context, not activate(): the trainer's own activation (this runs inside its checks) must survive
    with rt.batch([name] * len(prompts)) if name is not None else rt.disabled():
        embeds = image_embeds(rt.model, projector, ids, features.to(dev), slots)
        out = rt.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad)
    return [tok.decode(row, skip_special_tokens=True).strip() for row in out]


def evaluate_vqa(rt: AdapterRuntime, adapter: Adapter, examples: Sequence[Any], features: dict[Any, torch.Tensor],
                 batch_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """accuracy (exact match), accuracy per question type, n."""
    projector = _projector(adapter)
    right: dict[str, list[bool]] = {}
    with RowProgress(len(examples), progress) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start:start + batch_size])
            got = answer(rt, adapter.name, projector, torch.stack([features[image_key(e.image)] for e in chunk]),
                         [e.question for e in chunk])
            for e, g in zip(chunk, got):
                right.setdefault(e.qtype, []).append(g.lower() == e.answer.lower())
            bar.advance(len(chunk))
    every = [x for v in right.values() for x in v]
    return {"accuracy": sum(every) / max(len(every), 1),
            **{f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(right.items())}, "n": len(every)}


def _projector(adapter: Adapter) -> ImageProjector:
    if not isinstance(adapter.head, ImageProjector):
        raise ConfigError(f"adapter {adapter.name!r} has no image projector: it is not a vision-language adapter")
    return adapter.head


def train_vqa(base: Base, name: str, train_examples: Sequence[Any], eval_examples: Sequence[Any], *,
              image_base: Base, task: str | None, store: AdapterStore, config: TrainConfig, r: int = 8,
              alpha: float = 16.0,
              targets: Sequence[str] | None = None, max_length: int = 128, grid: int = DEFAULT_GRID,
              freeze_lm: bool = False, overwrite: bool = False, progress: bool = True, resume: bool = False,
              log_path: str | None = None, select_rows: int | None = None, method: str = "lora",
              method_options: dict[str, Any] | None = None,
              features: dict[Any, torch.Tensor] | None = None, image_adapter: bool = False,
              image_r: int = 8, norm: bool = DEFAULT_NORM,
              projector_from: Adapter | None = None) -> tuple[Adapter, dict[str, Any]]:
    """Train a VL adapter (projector + `method` adapter of the language model) on VQAExample rows. targets:
    default DEFAULT_TARGETS where the base has them; features: a feature_table of these images at `grid` made
    before (several runs over one data set compute it once); image_adapter: a LoRA (rank image_r, the image
    base's default sites) trains on the image base too, saved inside the projector; projector_from: a VL
    adapter whose projector this one starts from (LLaVA's two stages: an aligned projector, then the task's
    adapter), else a fresh projector."""
    if base.kind != "causal-lm" or base.tokenizer is None:
        raise ConfigError(f"a vision-language adapter needs a causal language model with a tokenizer as --base; "
                          f"{base.name} is a {base.kind}")
    if image_base.kind != "image":
        raise ConfigError(f"--image-base must be an image model (mobilenet-v2, or a ViT / CLIP folder); "
                          f"{image_base.name} is a {image_base.kind}")
    if not train_examples or not hasattr(train_examples[0], "question"):
        raise ConfigError("a vision-language adapter trains on visual question answering rows (a task such as "
                          "easy-vqa-colour: image, question, answer)")
    if targets is None:
        names = {n.rsplit(".", 1)[-1] for n, _ in base.model.named_modules()}
        targets = tuple(t for t in DEFAULT_TARGETS if t in names) or None
    start = None if projector_from is None else _projector(projector_from)
    if start is not None and image_adapter:
        raise ConfigError("--projector-from and --image-adapter do not combine: a projector to start from reads the "
                          "bare image base's features; train with one or the other")
    with run_lock(store, name):
        adapter = start_run(base, name, task=task, store=store, config=config, r=r, alpha=alpha, targets=targets,
                            overwrite=overwrite, resume=resume, method=method, options=method_options)
        shown = progress and dist_rank_world()[0] == 0
        side = None
        if image_adapter:                     # a LoRA on the image base too: features per step, through it
            from .fit import adapter_config
            from ..core.adapter import create_adapter

            side = ImageSide(image_base, create_adapter(f"{name}.image", image_base.model,
                                                         adapter_config("lora", image_base, r=image_r,
                                                                        alpha=2.0 * image_r),
                                                         seed=config.seed, fingerprint=image_base.fingerprint,
                                                         base_name=image_base.name), grid)
            features = None
        elif features is None:
            features = feature_table(image_base, [e.image for e in [*train_examples, *eval_examples]], grid,
                                     progress=shown)
        if features is not None:
            width = next(iter(features.values())).shape[-1]
        else:
            width = feature_table(image_base, [train_examples[0].image], grid, side=side).popitem()[1].shape[-1]
        emb = base.model.get_input_embeddings().weight
        if start is not None:
            adapter.head = start.start_copy(image_base.fingerprint, grid, width, emb.shape[1]).to(base.device)
        else:
            adapter.head = ImageProjector.create(image_base.name, image_base.fingerprint, grid, width, emb.shape[1],
                                                 float(emb.float().std()), config.seed, norm).to(base.device)
        tok = base.tokenizer
        rows = encode_rows(tok, train_examples, adapter.head.n_tokens, max_length)
        checks = selection_rows(list(eval_examples), select_rows, config.seed)

        def score(rt: AdapterRuntime) -> float:
            feats = features if side is None else feature_table(image_base, [e.image for e in checks], grid, side=side)
            return evaluate_vqa(rt, adapter, checks, feats)["accuracy"]
        info = {"objective": "vqa", **method_info(adapter), "targets": list(adapter.config.target_modules),
                "max_length": max_length, "image_base": image_base.name, "image_fingerprint": image_base.fingerprint,
                "grid": grid, "image_tokens": adapter.head.n_tokens, "freeze_lm": freeze_lm,
                "norm": adapter.head.norm, "projector_from": None if start is None else {
                    "name": projector_from.name, "projector": start.content()},
                "projector_params": adapter.head.num_parameters(),
                "image_adapter": None if side is None else {"r": image_r, "params": side.adapter.num_parameters()}}
        by_key = {image_key(e.image): e.image for e in train_examples}
        try:
            rt, result = fit(base, adapter, rows, vqa_collate(features, pad_id(tok), by_key, image_base.processor),
                             VQALoss(adapter.head, side), config, store=store, resume=resume, log_path=log_path,
                             progress=progress, extra_params=adapter.head.params() + (side.params if side else []),
                             evaluate=score if eval_examples else None, lengths=[len(x.input_ids) for x in rows],
                             run_info=info, eval_name="validation accuracy", freeze_adapter=freeze_lm)
            if side is not None:
                adapter.head.image_adapter = side.freeze()
                features = feature_table(image_base, [e.image for e in eval_examples], grid, side=side)
        finally:
            if side is not None:
                side.close()                  # the caller's image base is bare again, also after a failure
        metrics = evaluate_vqa(rt, adapter, eval_examples, features, progress=shown) if eval_examples else {}
        adapter.head.to("cpu")
        finish(store, adapter, metrics, {**asdict(config), **info, "train_examples": len(rows),
                                         "best_step": result.best_step}, overwrite)
        return adapter, metrics
