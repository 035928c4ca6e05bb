"""Incremental detokenisation with stop strings.

The text of a sequence is the decode of all its tokens (skip_special_tokens). Text is released only
once it can no longer turn out to start a stop string or end in half a UTF-8 character, so a stream
never shows text that the final answer cuts away.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1   # chars a stop string may still need
        self.ids: list[int] = []
        self.sent = 0                      # chars of text already released
        self.text = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one token; returns (newly released text, hit_stop). After a stop hit the text is
        cut before the stop string and everything up to there is released."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = self._find_stop(text)
        if hit is not None:
            self.text = text[:hit]
            return self._release(len(self.text)), True
        self.text = text
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):                                    # half a multi-byte character
            safe = min(safe, len(text) - 1)
        return self._release(safe), False

    def flush(self) -> str:
        """At the end (EOS, length, cancel): release whatever is held back."""
        return self._release(len(self.text))

    def _find_stop(self, text: str) -> Optional[int]:
        if not self.stop:
            return None
        begin = max(0, self.sent - self.hold)       # a stop string cannot lie wholly in released text
        hits = [i for i in (text.find(s, begin) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
