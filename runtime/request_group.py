"""One user request: its n samples, their text (with stop strings), and the output it reports."""

from typing import Any

from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
from kiln.runtime.request import Request
from kiln.runtime.sampling_params import SamplingParams


class RequestGroup:
    """The samples of one prompt. Sample 0 computes the prompt; the others then share its KV blocks."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        samples: list[Request],
        tokenizer: Any | None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.samples = samples
        self.samples_by_id = {sample.request_id: sample for sample in samples}
        self._single = len(samples) == 1
        self._pending_siblings = samples[1:]
        self._detokenizers = (
            {sample.request_id: IncrementalDetokenizer(tokenizer, prompt_token_ids, params) for sample in samples}
            if tokenizer is not None
            else {}
        )
        # DELTA outputs: per sample, the tokens and text characters earlier outputs already carried.
        self._sent_tokens = [0] * len(samples)
        self._sent_chars = [0] * len(samples)

    def on_token(self, request: Request) -> str | None:
        """Feed a sample's new token to its detokenizer; returns the stop string it hit, if any."""
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is None:
            return None
        detokenizer.push(request.output_token_ids[-1])
        if detokenizer.stopped_by is not None:
            return detokenizer.stopped_by
        if request.is_finished:
            detokenizer.finish()  # no more tokens: release text held back for a possible stop string
        return None

    def release_siblings(self, request: Request) -> list[Request]:
        """The other samples, once `request` (sample 0) has computed the whole prompt; then never again."""
        if not self._pending_siblings or request is not self.samples[0]:
            return []
        if request.num_computed_tokens < request.num_prompt_tokens and not request.is_finished:
            return []
        siblings, self._pending_siblings = self._pending_siblings, []
        for sibling in siblings:
            sibling.fork_from = request.request_id
        return siblings

    @property
    def finished(self) -> bool:
        """Whether every sample has ended."""
        if self._single:  # the common n = 1, asked every step for every request: no generator
            return self.samples[0].is_finished
        return all(sample.is_finished for sample in self.samples)

    def _first_token_time(self) -> float | None:
        if self._single:
            return self.samples[0].first_token_time
        times = [s.first_token_time for s in self.samples if s.first_token_time is not None]
        return min(times) if times else None

    def _finish_time(self) -> float | None:
        if self._single:
            return self.samples[0].finish_time
        times = [s.finish_time for s in self.samples if s.finish_time is not None]
        return max(times) if times else None

    @property
    def reports_every_step(self) -> bool:
        """Whether a step that advanced the request reports it (FINAL_ONLY requests report only at the end)."""
        return self.params.output_kind is not RequestOutputKind.FINAL_ONLY

    def output(self) -> RequestOutput:
        """The request's output: all so far (CUMULATIVE, FINAL_ONLY) or what is new since the last (DELTA)."""
        first = self.samples[0]
        delta = self.params.output_kind is RequestOutputKind.DELTA
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None and not (delta and self._sent_tokens[0] > 0):
            prompt_logprobs = [None, *first.prompt_logprobs]
        finished = self.finished
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_token_time=self._first_token_time(),
            finish_time=self._finish_time() if finished else None,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_cached_prompt_tokens=first.num_cached_prompt_tokens,
            num_preemptions=first.num_preemptions if self._single else sum(s.num_preemptions for s in self.samples),
            first_scheduled_time=first.first_scheduled_time,  # the first sample computes the shared prompt
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=[
                self._new_part(index, sample) if delta else self._completion(index, sample)
                for index, sample in enumerate(self.samples)
            ],
            finished=finished,
            metrics=metrics,
        )

    def _completion(self, index: int, sample: Request) -> CompletionOutput:
        detokenizer = self._detokenizers.get(sample.request_id)
        return CompletionOutput(
            index=index,
            text=detokenizer.text if detokenizer is not None else "",
            token_ids=list(sample.output_token_ids),
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
            logprobs=list(sample.logprobs) if self.params.logprobs is not None else None,
        )

    def _new_part(self, index: int, sample: Request) -> CompletionOutput:
        """What sample `index` added since the last output: O(new tokens), however long it has grown."""
        detokenizer = self._detokenizers.get(sample.request_id)
        first_token, first_char = self._sent_tokens[index], self._sent_chars[index]
        self._sent_tokens[index] = len(sample.output_token_ids)
        if detokenizer is not None:
            self._sent_chars[index] = detokenizer.text_length
        return CompletionOutput(
            index=index,
            text=detokenizer.text_since(first_char) if detokenizer is not None else "",
            token_ids=sample.output_token_ids[first_token:],
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
            logprobs=sample.logprobs[first_token:] if self.params.logprobs is not None else None,
        )
