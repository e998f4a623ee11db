"""`LLM`: the offline Python API, in the shape vLLM and TensorRT-LLM users know."""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kiln.core.errors import UserInputError
from kiln.runtime.engine import LLMEngine
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.model_dir import resolve_model_source
from kiln.runtime.outputs import RequestOutput, RequestOutputKind
from kiln.runtime.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class StreamDelta:
    """What one step added to a streamed request."""

    text: str  # new text of the first completion
    token_ids: list[int]  # new token ids of the first completion
    output: RequestOutput  # the whole request so far


class LLM:
    """Generate text with a model: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str, **engine_options: Any) -> None:
        """model: checkpoint artifact, Hugging Face directory or builtin:NAME; options as in EngineConfig."""
        unknown = sorted(set(engine_options) - set(EngineConfig.__dataclass_fields__))
        if unknown:
            raise UserInputError(f"unknown LLM option(s): {', '.join(unknown)}")
        self.engine = LLMEngine(resolve_model_source(model), EngineConfig(**engine_options))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion with continuous batching; outputs come back in input order."""
        prompt_list = _as_prompt_list(prompts)
        # Only finished outputs are read here: the engine need not copy every request's tokens every step.
        params_list = [
            replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
            for params in _as_params_list(sampling_params, len(prompt_list))
        ]
        request_ids = [self._add(prompt, params) for prompt, params in zip(prompt_list, params_list)]
        finals: dict[str, RequestOutput] = {}
        try:
            while len(finals) < len(request_ids):
                for output in self.engine.step():
                    if output.finished:
                        finals[output.request_id] = output
                        if on_output is not None:
                            on_output(output)
        except BaseException:
            for request_id in request_ids:  # Ctrl-C or an error: leave no request holding KV blocks
                self.engine.abort(request_id)
            raise
        return [finals[request_id] for request_id in request_ids]

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Generate one request, yielding the new text after every step that produced some."""
        params = replace(sampling_params or SamplingParams(), output_kind=RequestOutputKind.CUMULATIVE)
        request_id = self._add(prompt, params)
        text_seen, tokens_seen = 0, 0
        try:
            finished = False
            while not finished:
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    finished = output.finished
                    completion = output.outputs[0]
                    delta = StreamDelta(completion.text[text_seen:], completion.token_ids[tokens_seen:], output)
                    text_seen, tokens_seen = len(completion.text), len(completion.token_ids)
                    yield delta
        finally:
            self.engine.abort(request_id)  # a consumer that stops early frees the request's blocks

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate(
            [self.apply_chat_template(conversation) for conversation in conversations], sampling_params
        )

    def apply_chat_template(self, messages: Messages) -> list[int]:
        """Token ids of a conversation with the generation prompt added."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise UserInputError("this model has no chat template; pass plain prompts instead")
        if not messages:
            raise UserInputError("messages is empty; give at least one message")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserInputError("this model has no tokenizer; pass token id lists instead of text")
            return self.engine.add_request(self.tokenizer(prompt).input_ids, params, prompt=prompt)
        return self.engine.add_request(list(prompt), params)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, int) for p in prompts):
        return [list(prompts)]  # one prompt given as token ids
    prompt_list = list(prompts)
    for prompt in prompt_list:
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise UserInputError("each prompt must be a string or a list of token ids")
    return prompt_list


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params_list = list(params)
    if len(params_list) != count:
        raise UserInputError(f"{len(params_list)} sampling params for {count} prompts; give one or one per prompt")
    return params_list
