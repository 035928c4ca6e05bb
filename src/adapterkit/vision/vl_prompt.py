"""Prompts with images for a vision-language adapter: chat messages whose content parts may be images are
rendered with the language model's chat template, each image as IMAGE_MARK, then tokenised piece by piece
with n placeholder ids where each image goes. The model's embeddings of those ids are replaced by the
projector's image tokens (training: train/vqa.py; serving: the engine's prompt embeddings).

Training and serving build prompts with these same functions, so an adapter sees at inference exactly
the token layout it learned on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

IMAGE_MARK = "\ue000"          # a private-use character: stands for one image in a rendered prompt


@dataclass(frozen=True)
class ImagePrompt:
    ids: list[int]             # the prompt's token ids; image positions hold a placeholder id
    slots: list[int]           # [images * n] positions whose embeddings become image tokens, image by image


def content_text(content: Any) -> tuple[str, int]:
    """A message's content (a string, or parts {"type": "text", "text"} / {"type": "image"}) -> (its text with
    IMAGE_MARK for each image, the number of images). Text holding IMAGE_MARK itself is refused."""
    if content is None:
        return "", 0
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    out, images = [], 0
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text = str(part.get("text", ""))
            if IMAGE_MARK in text:
                raise ConfigError("the text holds the character U+E000, which stands for an image here; remove it")
            out.append(text)
        elif kind in ("image", "image_url"):
            out.append(IMAGE_MARK)
            images += 1
        else:
            raise ConfigError(f"unknown content part {part!r}: use text or image parts")
    return "".join(out), images


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> tuple[str, int]:
    """(the chat rendered by the tokenizer's template with IMAGE_MARK per image, the number of images)."""
    rendered, images = [], 0
    for m in messages:
        text, n = content_text(m.get("content"))
        rendered.append({**m, "content": text})
        images += n
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=generation_prompt), images
    text = "".join(f"{m['role']}: {m['content']}\n" for m in rendered) + ("assistant:" if generation_prompt else "")
    return text, images


def encode_images(tokenizer: Any, text: str, n_tokens: int, placeholder: int) -> ImagePrompt:
    """Tokenise `text` (rendered; special tokens already written) with n_tokens placeholder ids per IMAGE_MARK."""
    pieces = text.split(IMAGE_MARK)
    ids: list[int] = []
    slots: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            slots += range(len(ids), len(ids) + n_tokens)
            ids += [placeholder] * n_tokens
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ImagePrompt(ids, slots)


def vqa_messages(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    """One image and a question (then the answer, for training), as a chat."""
    out: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out


def encode_vqa(tokenizer: Any, question: str, answer: str | None, n_tokens: int, placeholder: int
               ) -> tuple[ImagePrompt, list[int]]:
    """(the prompt up to the assistant's turn, the answer's ids up to and including the end of the turn)."""
    prompt_text, _ = render_chat(tokenizer, vqa_messages(question), True)
    prompt = encode_images(tokenizer, prompt_text, n_tokens, placeholder)
    if answer is None:
        return prompt, []
    full_text, _ = render_chat(tokenizer, vqa_messages(question, answer), False)
    if not full_text.startswith(prompt_text):
        raise ConfigError("the chat template renders the prompt differently inside the full chat; this tokenizer's "
                          "template cannot train a vision-language adapter")
    answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None:
        answer_ids = answer_ids[: answer_ids.index(eos) + 1] if eos in answer_ids else answer_ids + [eos]
    return prompt, answer_ids
