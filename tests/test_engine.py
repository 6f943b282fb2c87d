import pytest
import torch

from llama import Llama
from llama.engine import Engine, QueueFull, Request
from llama.sampling import SamplingParams

CHUNK = 16
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def generator(tiny_ckpt) -> Llama:
    return Llama.build(tiny_ckpt, max_seq_len=256, max_batch_size=16, dtype="float32", prefill_chunk=CHUNK)


def prompts(count: int):
    """Prompts of 3 to about 100 tokens, several over one chunk, none a prefix of another."""
    return [[128000] + [(97 * i + 13 * j) % 5000 + 100 for j in range(2 + (i * 37) % 100)] for i in range(count)]


def run(engine: Engine, requests, *, arrive_every: int = 0):
    """Step `engine` until every request has finished, the i-th submitted before step i * arrive_every."""
    pending, step = list(requests), 0
    while pending or engine.has_work():
        while pending and step >= arrive_every * (len(requests) - len(pending)):
            engine.submit(pending.pop(0))
        engine.step()
        step += 1
    return [r.sequence.tokens for r in requests]


def greedy_requests(generator, token_lists, max_tokens=10, sampling=GREEDY):
    return [Request(p, generator.tokenizer, max_tokens, sampling) for p in token_lists]


def fresh_engine(generator, **options) -> Engine:
    """An engine with empty slots (nothing to reuse) on the generator's model."""
    return Engine(generator.model, prefill_chunk=CHUNK, **options)


def test_sixteen_requests_get_what_each_gets_alone(generator):
    token_lists = prompts(16)
    alone = [run(fresh_engine(generator), greedy_requests(generator, [p]))[0] for p in token_lists]
    together = run(fresh_engine(generator), greedy_requests(generator, token_lists), arrive_every=2)
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1  # different prompts, different continuations


def test_seeded_sampling_repeats_among_other_requests(generator):
    token_lists = prompts(6)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = run(fresh_engine(generator), greedy_requests(generator, token_lists[:1], 16, seeded))[0]
    others = [Request(p, generator.tokenizer, 16, SamplingParams(temperature=1.0)) for p in token_lists[1:]]
    mixed = run(fresh_engine(generator), [*others[:3], *greedy_requests(generator, token_lists[:1], 16, seeded),
                                          *others[3:]], arrive_every=1)
    assert mixed[3] == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321)
    assert run(fresh_engine(generator), greedy_requests(generator, token_lists[:1], 16, other_seed))[0] != alone


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(generator, monkeypatch):
    engine = fresh_engine(generator)
    steps = []
    forward_batch = generator.model.forward_batch

    def recording(tokens, batch, logit_rows):
        steps.append([(s.length, s.start) for s in batch.segments])
        return forward_batch(tokens, batch, logit_rows)

    monkeypatch.setattr(generator.model, "forward_batch", recording)
    running = greedy_requests(generator, [[128000, 300 + i] for i in range(3)], max_tokens=40)
    for request in running:
        engine.submit(request)
    engine.step()
    long_prompt = greedy_requests(generator, [[128000] + list(range(1000, 1150))], max_tokens=2)[0]
    engine.submit(long_prompt)
    steps.clear()
    while not long_prompt.finished:
        engine.step()
    prompt_chunks = [[length for length, start in step if length > 1] for step in steps]
    assert sum(map(sum, prompt_chunks)) == 151
    assert all(sum(chunks) <= CHUNK for chunks in prompt_chunks)
    assert all(sum(length == 1 for length, _ in step) >= 3 for step in steps[:-2])  # the others keep decoding


def test_a_prompt_reuses_whole_chunks_of_a_free_slots_prefix_and_gets_the_same_tokens(generator, monkeypatch):
    first_turn = prompts(3)[2][:70]
    second_turn = first_turn + [500, 501, 502]
    engine = fresh_engine(generator)
    run(engine, greedy_requests(generator, [first_turn]))
    fed = []
    forward_batch = generator.model.forward_batch
    monkeypatch.setattr(generator.model, "forward_batch",
                        lambda tokens, batch, rows: fed.append(len(tokens)) or forward_batch(tokens, batch, rows))
    reused = run(engine, greedy_requests(generator, [second_turn]))[0]
    assert fed[0] == len(second_turn) - 64  # 4 whole chunks of 16 reused
    fed.clear()
    assert run(fresh_engine(generator), greedy_requests(generator, [second_turn]))[0] == reused
    assert fed[0] == len(second_turn)  # without a cached prefix the prompt starts from position 0


def test_cancelling_frees_the_slot_and_a_full_queue_refuses(generator):
    engine = fresh_engine(generator, max_queue=1)  # 16 slots: fill them
    holders = greedy_requests(generator, prompts(16), max_tokens=200)
    for request in holders:
        engine.submit(request)
        engine.step()
    assert engine.running_count == 16
    waiting = greedy_requests(generator, prompts(1))[0]
    engine.submit(waiting)
    with pytest.raises(QueueFull):
        engine.submit(greedy_requests(generator, prompts(1))[0])
    holders[0].cancel()
    engine.step()
    assert holders[0].finished and waiting.slot == holders[0].slot and engine.queue_length == 0
    for request in holders:
        request.cancel()
    engine.release_cancelled()
    run(engine, [])
    assert engine.running_count == 0 and waiting.finished


def test_prompt_logprobs_are_the_models(generator):
    prompt = prompts(2)[1][:40]
    request = Request(prompt, generator.tokenizer, 3, SamplingParams(temperature=0, logprobs=True, prompt_logprobs=True))
    run(fresh_engine(generator), [request])
    model = generator.model
    with torch.inference_mode():
        logits = model.forward(torch.tensor([prompt + request.tokens[len(prompt):-1]]), 0)[0]
    targets = torch.tensor(request.tokens[1:])
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(torch.tensor(request.sequence.token_logprobs), expected, atol=1e-4)


def test_requests_check_their_arguments(generator):
    with pytest.raises(ValueError, match="positive integer"):
        Request([1, 2], generator.tokenizer, 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="no room"):
        fresh_engine(generator).submit(Request([1] * 256, generator.tokenizer, 1))
