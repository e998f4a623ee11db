"""The batched sampler: greedy, per-request seeded draws, filters vs a plain reference, penalties, logprobs."""

import math

import pytest
import torch

from kiln.runtime.sampler import Sampler, SamplingBatch, apply_penalties, apply_top_k_top_p_min_p, suppress_tokens
from kiln.runtime.sampling_params import SamplingParams

VOCAB = 50
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_batch(
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    device: str = "cpu",
) -> SamplingBatch:
    seeds = seeds if seeds is not None else list(range(len(params)))
    prompts = prompts if prompts is not None else [[] for _ in params]
    outputs = outputs if outputs is not None else [[] for _ in params]
    return SamplingBatch.build(params, seeds, prompts, outputs, device)


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0)
    out = Sampler()(logits, make_batch([greedy] * 4))
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.sampled_logprobs is None and out.top_logprobs is None

    mixed = [greedy, SamplingParams(temperature=1.5, seed=1), greedy, SamplingParams(top_k=3, seed=2)]
    out = Sampler()(logits, make_batch(mixed, seeds=[5, 1, 6, 2]))
    assert out.sampled_token_ids[[0, 2]].tolist() == logits[[0, 2]].argmax(dim=-1).tolist()


def test_build_takes_host_decisions_from_the_params() -> None:
    params = [SamplingParams(temperature=0, top_k=5), SamplingParams(top_k=-1, min_p=0.1)]
    batch = make_batch(params)
    assert batch.temperature.tolist() == [0.0, 1.0] and batch.top_k.tolist() == [5, 0]
    assert (batch.all_greedy, batch.all_random) == (False, False)
    # The greedy row's top_k never matters, and -1 means off: no row needs the top-k pass.
    assert (batch.use_top_k, batch.use_top_p, batch.use_min_p) == (False, False, True)
    assert batch.prompt_token_ids is None and batch.output_token_ids is None and batch.max_num_logprobs is None


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_row_draws_the_same_tokens_whatever_its_neighbours(device: str) -> None:
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    others = [SamplingParams(temperature=1.3), SamplingParams(top_k=7), SamplingParams(min_p=0.05, temperature=0.5)]
    data = torch.Generator().manual_seed(0)
    steps = [torch.randn(1 + len(others), VOCAB, generator=data).to(device) for _ in range(20)]

    def draw(batch_params: list[SamplingParams], seeds: list[int], outputs: list[list[int]], logits, row: int) -> int:
        return (
            Sampler()(logits, make_batch(batch_params, seeds, outputs=outputs, device=device))
            .sampled_token_ids[row]
            .item()
        )

    # The row's position (tokens produced so far) advances each step, as in the engine.
    alone_tokens = [draw([target], [1234], [[0] * i], step[:1], 0) for i, step in enumerate(steps)]
    order = [1, 2, 0, 3]  # row 0 of each step goes to index 2, among neighbours at other positions
    mixed = [others[0], others[1], target, others[2]]
    mixed_tokens = [
        draw(mixed, [3, 7, 1234, 99], [[0] * (i + 5), [], [0] * i, [1] * 2], step[order], 2)
        for i, step in enumerate(steps)
    ]

    assert alone_tokens == mixed_tokens
    assert len(set(alone_tokens)) > 3  # it really sampled: the position changes the noise


def test_seeds_and_positions_give_independent_draws() -> None:
    logits = torch.zeros(2000, 4)  # uniform over 4 tokens
    by_seed = Sampler()(logits, make_batch([SamplingParams()] * 2000, seeds=list(range(2000)))).sampled_token_ids
    outputs = [[0] * i for i in range(2000)]
    by_position = Sampler()(logits, make_batch([SamplingParams()] * 2000, seeds=[7] * 2000, outputs=outputs))
    for tokens in (by_seed, by_position.sampled_token_ids):
        assert torch.bincount(tokens, minlength=4).tolist() == pytest.approx([500] * 4, abs=90)


@pytest.mark.gpu
def test_the_triton_draw_equals_the_reference() -> None:
    from kiln.kernels.random_draw import exponential_race_reference, row_keys
    from kiln.kernels.triton_random_draw import triton_exponential_race

    data = torch.Generator().manual_seed(1)
    for rows, vocab in [(1, 1), (3, 50), (64, 128256), (300, 3000), (2, 2 * 8192 + 5)]:  # chunk edges too
        probs = torch.softmax(3 * torch.randn(rows, vocab, generator=data), dim=-1)
        keys = torch.from_numpy(row_keys(range(rows), [seed % 17 for seed in range(rows)]))
        expected = exponential_race_reference(probs, keys)
        assert torch.equal(triton_exponential_race(probs.cuda(), keys.cuda()).cpu(), expected)


@pytest.mark.gpu
def test_the_triton_logit_draw_equals_the_reference() -> None:
    from kiln.kernels.random_draw import logit_race_reference, row_keys
    from kiln.kernels.triton_random_draw import triton_logit_race

    data = torch.Generator().manual_seed(2)
    for rows, vocab in [(1, 1), (3, 50), (64, 128256), (300, 3000), (2, 2 * 8192 + 5)]:  # chunk edges too
        logits = 3 * torch.randn(rows, vocab, generator=data)
        logits[:, 1::7] = -math.inf  # filtered out
        inv_temperature = torch.rand(rows, generator=data) + 0.5
        keys = torch.from_numpy(row_keys(range(rows), [seed % 17 for seed in range(rows)]))
        expected = logit_race_reference(logits, inv_temperature, keys)
        assert torch.equal(triton_logit_race(logits.cuda(), inv_temperature.cuda(), keys.cuda()).cpu(), expected)


def test_the_log_space_draw_picks_the_probabilities_token() -> None:
    # Same noise, same distribution: argmax p / E = argmax logits / T - log E, up to float rounding at near ties
    from kiln.kernels.random_draw import exponential_race_reference, logit_race_reference, row_keys

    data = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(512, 2000, generator=data)
    logits[:, ::5] = -math.inf
    inv_temperature = torch.rand(512, generator=data) * 2 + 0.25
    keys = torch.from_numpy(row_keys(range(512), [7] * 512))
    probs = torch.softmax(logits * inv_temperature[:, None], dim=-1)
    expected = exponential_race_reference(probs, keys)
    assert torch.equal(logit_race_reference(logits, inv_temperature, keys), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_the_top_noise_value_wins_its_race(device: str) -> None:
    # Key 24710634 gives token 3 the top noise value, (2^24 - 0.5) / 2^24, which is 1.0 in fp32 uncapped: its
    # E = -log u was 0 and the token could never win. Capped below 1, its E is ~6e-8 and it wins.
    from kiln.kernels.random_draw import exponential_race, logit_race

    keys = torch.tensor([24710634], device=device)
    logits = torch.zeros(1, 8, device=device)
    assert exponential_race(torch.softmax(logits, dim=-1), keys).item() == 3
    assert logit_race(logits, torch.ones(1, device=device), keys).item() == 3


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_from_logits_gives_the_same_tokens(device: str, monkeypatch) -> None:
    # KILN_SAMPLE_FROM_LOGITS=1 (one pass over the logits) against the default (division, softmax, draw)
    logits = 3 * torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(4))
    kinds = [SamplingParams(temperature=0.7), SamplingParams(temperature=0), SamplingParams(temperature=1.3)]
    filtered = [SamplingParams(temperature=0.9, top_k=10), SamplingParams(top_p=0.8), SamplingParams(min_p=0.05)]
    for params in (kinds * 21 + kinds[:1], [SamplingParams(temperature=0.8)] * 64, filtered * 21 + filtered[:1]):
        batch = make_batch(params, seeds=list(range(64)), device=device)
        tokens = []
        for switch in ("0", "1"):
            monkeypatch.setenv("KILN_SAMPLE_FROM_LOGITS", switch)
            tokens.append(Sampler()(logits.to(device), batch).sampled_token_ids.cpu())
        assert torch.equal(tokens[0], tokens[1])


def reference_filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row, written the plain way: keep the k best, then the nucleus, then tokens above min_p * p_max."""
    order = logits.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k > 0 else order
    if top_p < 1.0:
        probs = torch.softmax(logits[keep], dim=-1).tolist()
        nucleus, mass = [], 0.0
        for token, p in zip(keep, probs):
            nucleus.append(token)
            mass += p
            if mass >= top_p:
                break
        keep = nucleus
    if min_p > 0.0:
        probs = torch.softmax(logits[keep], dim=-1)
        keep = [t for t, p in zip(keep, probs.tolist()) if p >= min_p * probs.max().item()]
    out = torch.full_like(logits, -math.inf)
    out[keep] = logits[keep]
    return out


def test_filters_match_a_plain_reference() -> None:
    # (top_k, top_p, min_p) per row; zeros/ones are "off", including every filter off at once.
    settings = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.1), (10, 0.7, 0.0), (3, 0.5, 0.2),
                (0, 0.9, 0.05), (VOCAB + 10, 1.0, 0.0), (1, 1.0, 0.0), (20, 0.95, 0.01)]  # fmt: skip
    logits = 2.0 * torch.randn(len(settings), VOCAB, generator=torch.Generator().manual_seed(3))
    top_k = torch.tensor([s[0] for s in settings])
    top_p = torch.tensor([s[1] for s in settings])
    min_p = torch.tensor([s[2] for s in settings])

    filtered = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)

    expected = torch.stack([reference_filter(row, *s) for row, s in zip(logits, settings)])
    assert torch.equal(filtered, expected)
    assert torch.equal(filtered[0], logits[0])  # every filter off: untouched
    assert torch.equal(apply_top_k_top_p_min_p(logits, None, None, None), logits)


def test_draws_follow_the_filtered_distribution() -> None:
    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01])
    logits = (probs.log() * 0.7).expand(3000, -1)  # dividing by temperature 0.7 gives back `probs`
    params = SamplingParams(temperature=0.7, top_p=0.8)  # nucleus: 0.35 + 0.25 + 0.15 + 0.1 >= 0.8
    out = Sampler()(logits, make_batch([params] * 3000, seeds=list(range(3000))))

    counts = torch.bincount(out.sampled_token_ids, minlength=8).double()
    assert counts[4:].sum() == 0
    expected = probs[:4].double() / probs[:4].sum() * 3000
    chi_square = ((counts[:4] - expected) ** 2 / expected).sum().item()
    assert chi_square < 16.3  # 3 degrees of freedom, p = 0.001


def test_penalties_match_hand_computed_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    params = [
        SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(temperature=0),  # penalties off: untouched
    ]
    # Row 0: prompt saw token 1; output has token 0 twice and token 4 once.
    batch = make_batch(params, prompts=[[1], [0, 1, 2]], outputs=[[0, 4, 0], [3]])
    assert batch.prompt_token_ids is not None and batch.output_token_ids is not None

    penalised = apply_penalties(logits, batch.prompt_token_ids, batch.output_token_ids, batch.repetition_penalty,
                                batch.presence_penalty, batch.frequency_penalty)  # fmt: skip
    # token 0: 2 / 2 - 0.5 - 2 * 0.25; token 1: -1 * 2 (prompt only); token 4: -2 * 2 - 0.5 - 0.25.
    assert penalised[0].tolist() == [0.0, -2.0, 0.5, 3.0, -4.75]
    assert torch.equal(penalised[1], logits[1])
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [3, 0]


def test_logprobs_come_from_the_raw_logits() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    params = [
        SamplingParams(temperature=0.5, logprobs=4, repetition_penalty=1.5, seed=1),
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(top_k=3, seed=2),
    ]
    out = Sampler()(logits, make_batch(params, seeds=[1, 5, 2], prompts=[[1, 2], [3], []]))

    raw = torch.log_softmax(logits, dim=-1)
    assert out.top_logprobs is not None and out.top_logprob_ids is not None and out.sampled_logprobs is not None
    assert out.top_logprob_ids.shape == (3, 4)  # the batch's largest `logprobs`; rows slice their own
    assert torch.equal(out.top_logprob_ids, raw.argsort(dim=-1, descending=True)[:, :4])
    assert torch.equal(out.top_logprobs, raw.gather(1, out.top_logprob_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.equal(out.sampled_logprobs, raw.gather(1, out.sampled_token_ids[:, None]).squeeze(1))

    only_sampled = Sampler()(logits, make_batch([SamplingParams(logprobs=0, seed=0)] * 3, seeds=[0, 1, 2]))
    assert only_sampled.top_logprob_ids is not None and only_sampled.top_logprob_ids.shape == (3, 0)
    assert only_sampled.sampled_logprobs is not None and only_sampled.sampled_logprobs.shape == (3,)


def test_suppress_tokens_masks_each_rows_tokens() -> None:
    logits = torch.zeros(3, 6)
    suppress_tokens(logits, [0, 2], [[5, 1], [5]])
    assert torch.isinf(logits).nonzero().tolist() == [[0, 1], [0, 5], [2, 5]]
    assert (logits[torch.isinf(logits)] < 0).all()
    suppress_tokens(logits, [], [])  # nothing to do
    assert torch.isinf(logits).sum() == 3


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_sampling_on_cuda_never_waits_for_the_device() -> None:
    params = [
        SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.2),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.02, presence_penalty=0.5, seed=1),
        SamplingParams(frequency_penalty=-0.3, logprobs=0),
    ]
    logits = torch.randn(3, 1000, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        batch = SamplingBatch.build(params, [0, 1, 2], [[1, 2, 3], [4], []], [[5], [6, 6], [7, 8, 9]], "cuda")
        suppress_tokens(logits, [0, 2], [[1], [2, 3]])
        out = Sampler()(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.sampled_token_ids.device.type == "cuda" and out.sampled_token_ids.shape == (3,)
    assert out.top_logprob_ids is not None and out.top_logprob_ids.shape == (3, 3)
