"""One user request: its n samples, their text (with stop strings), and the output it reports."""

from typing import Any

from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
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
        self._pending_siblings = samples[1:]
        self._detokenizers = (
            {sample.request_id: IncrementalDetokenizer(tokenizer, prompt_token_ids, params) for sample in samples}
            if tokenizer is not None
            else {}
        )

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
        return all(sample.is_finished for sample in self.samples)

    def output(self) -> RequestOutput:
        """A snapshot of the request: text so far of every sample, timings, logprobs."""
        first = self.samples[0]
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *first.prompt_logprobs]
        first_token_times = [s.first_token_time for s in self.samples if s.first_token_time is not None]
        finish_times = [s.finish_time for s in self.samples if s.finish_time is not None]
        finished = self.finished
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_token_time=min(first_token_times) if first_token_times else None,
            finish_time=max(finish_times) if finished and finish_times else None,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_cached_prompt_tokens=first.num_cached_prompt_tokens,
            num_preemptions=sum(s.num_preemptions for s in self.samples),
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=[self._completion(index, sample) for index, sample in enumerate(self.samples)],
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
