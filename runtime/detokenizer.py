"""Incremental detokenization of one request's output, with stop strings that may span tokens."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kiln.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded as left context, so the first output token decodes as it does mid-text (a
# SentencePiece "▁word" keeps its leading space). vLLM uses the same offset.
_PROMPT_CONTEXT_TOKENS = 5
# Token ids before the decode window are dropped once this many pile up, so memory stays bounded too.
_MAX_DEAD_TOKENS = 256


class IncrementalDetokenizer:
    """Turns output token ids into text one token at a time, holding back what is not final yet.

    Each push decodes only a short window (prefix offset .. end, as vLLM and TGI do): the text of
    `ids[prefix_offset:read_offset]` is already emitted, and what the window adds beyond it is new. Text
    is held back while it ends in an incomplete UTF-8 character ("\\ufffd") or in a tail that may still
    grow into a stop string. `text` is always the concatenation of what push and finish returned.
    """

    def __init__(
        self, tokenizer: "PreTrainedTokenizerBase", prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        # Every token decodes two short windows; transformers' decode wraps the Rust tokenizer's in Python
        # work worth ~5x the decode itself (~20 us a token, ~5 ms a step at batch 256). Without its text
        # clean-up (off for today's LLM tokenizers) the result is the Rust call's, so call it directly.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend_decode = backend.decode if backend is not None and not cleans_up else None
        self._stop: tuple[str, ...] = params.stop  # type: ignore[assignment]  # normalised by SamplingParams
        self._include_stop = params.include_stop_str_in_output
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        if self._decode(0).endswith("\ufffd"):
            # The prompt ends inside a character: output bytes would merge into it. Decode without context
            # so that the text always equals decode(output ids).
            self._ids, self._read_offset = [], 0
        self._decoded = ""  # all complete text so far, truncated at a stop match
        self._num_emitted = 0  # characters of _decoded already returned
        self._stopped_by: str | None = None

    @property
    def text(self) -> str:
        """Output text returned so far (ends before the stop string unless include_stop_str_in_output)."""
        return self._decoded[: self._num_emitted]

    @property
    def text_length(self) -> int:
        """Characters of output text returned so far."""
        return self._num_emitted

    def text_since(self, start: int) -> str:
        """Output text from character `start` on (a step's new text, without copying all of it)."""
        return self._decoded[start : self._num_emitted]

    @property
    def stopped_by(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stopped_by

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (often "", never after a stop)."""
        if self._stopped_by is not None:
            return ""
        self._ids.append(token_id)
        return self._append(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """Return the held-back text at the end of generation (the request ended without a stop string)."""
        if self._stopped_by is not None:
            return ""
        return self._append(self._decode_new(final=True), final=True)

    def _decode(self, start: int, end: int | None = None) -> str:
        ids = self._ids[start:end]
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text the tokens after read_offset add, or "" while it ends in a partial character."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset)
        if len(window_text) <= len(prefix_text) or (window_text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > _MAX_DEAD_TOKENS:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return window_text[len(prefix_text) :]

    def _append(self, new_text: str, final: bool) -> str:
        """Add decoded text, look for a stop string that ends in it, and return what is now final."""
        old_length = len(self._decoded)
        self._decoded += new_text
        if new_text and self._stop:
            match = self._find_stop(old_length)
            if match is not None:
                start, stop = match
                self._stopped_by = stop
                self._decoded = self._decoded[: start + len(stop) if self._include_stop else start]
                return self._emit(len(self._decoded))
        # With the stop string included in the output, text before a possible match is final anyway.
        held = 0 if final or self._include_stop else self._partial_stop_length()
        return self._emit(len(self._decoded) - held)

    def _find_stop(self, old_length: int) -> tuple[int, str] | None:
        """The earliest stop-string match that ends in the text after `old_length` (earlier ones were seen)."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            start = self._decoded.find(stop, max(0, old_length - len(stop) + 1))
            if start >= 0 and (best is None or start < best[0]):
                best = (start, stop)
        return best

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._decoded)), longest, -1):
                if self._decoded.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _emit(self, end: int) -> str:
        text = self._decoded[self._num_emitted : end]
        self._num_emitted = max(self._num_emitted, end)
        return text
