"""The prompt cache across requests (`polycoder.generation.prompt_cache`): a prompt that
extends or shares a prefix with a recent one prefills only the rest, and the greedy tokens
are the cold ones (fp32) with every decode step the engine can pick; the pool stays within
its bytes; rows copied for n samples, a draft model's own cache, cancellation; and the
server's option and metrics, on a real server on loopback."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
from serve_server import Server, post, still_serves

from polycoder import kernels
from polycoder.backend import PLAIN, Backend
from polycoder.checkpoint import load_model
from polycoder.errors import PolycoderError
from polycoder.generation.engine import Engine
from polycoder.generation.prompt_cache import PromptCache, kv_bytes_per_token
from polycoder.generation.sampling import SamplingParams, sample_generator
from polycoder.generation.text import Sequence

# An editor's buffer and what typing does to it: each keystroke adds a character or two.
BUFFER = ("import os\nimport sys\n\n\ndef read_config(path):\n    \"\"\"Read key=value lines.\"\"\"\n"
          "    config = {}\n    with open(path) as f:\n        for line in f:\n            line = line.strip()\n"
          "            if not line or line.startswith('#'):\n                continue\n"
          "            key, _, value = line.partition('=')\n            config[key.strip()] = value.strip()\n"
          "    return config\n\n\ndef main(argv):\n    cfg = read_config(argv[1])\n    for k in sorted(cfg):\n")
KEYSTROKES = ["        pr", "        print", "        print(k", "        print(k, cfg[k])"]

NATIVE = pytest.param(Backend(native_kernels=True), id="native",
                      marks=pytest.mark.skipif(not kernels.available(), reason="native kernels off or not built"))
BACKENDS = [NATIVE, pytest.param(PLAIN, id="plain"),
            pytest.param("static", id="static-shapes")]  # the CUDA-graph step's shapes, eagerly


@pytest.fixture(scope="module")
def model(tiny_folder):
    return load_model(tiny_folder)


def engine_for(model, backend, mb: float = 64, rows: int = 4, **kw) -> Engine:
    net, tok = model
    if backend == "static":
        return Engine(net, tok, max_rows=rows, max_len=net.config.block_size, backend=PLAIN, static_shapes=True,
                      prompt_cache_mb=mb, **kw)
    return Engine(net, tok, max_rows=rows, max_len=net.config.block_size, backend=backend, prompt_cache_mb=mb, **kw)


def run(engine: Engine, ids: list[int], n: int = 1, max_new: int = 16, **params) -> list[list[int]]:
    """Every sample's tokens of one prompt, alone in the engine."""
    p = SamplingParams(max_new_tokens=max_new, num_samples=n, stop_at_eod=False, **params)
    seqs = [Sequence(list(ids), p, engine.tokenizer, sample_generator(7, 0, j)) for j in range(n)]
    engine.add(seqs)
    while engine.rows:
        engine.step()
    return [s.token_ids for s in seqs]


@pytest.mark.parametrize("backend", BACKENDS)
def test_keystrokes_reuse_the_prompt_and_give_the_cold_tokens(model, backend):
    net, tok = model
    cold, warm = engine_for(model, backend, mb=0), engine_for(model, backend)
    base = tok.encode(BUFFER)
    assert run(warm, base) == run(cold, base)
    for typed in KEYSTROKES:
        ids = tok.encode(BUFFER + typed)
        before = warm.stats["reused"]
        assert run(warm, ids) == run(cold, ids), typed
        # every token of the last prompt that the new one still starts with was reused
        assert warm.stats["reused"] - before >= len(base) - 1
    assert warm.prompt_cache.stats["hits"] == len(KEYSTROKES)
    assert len(warm.prompt_cache) == 1  # each prompt extended the last: one entry holds the chain
    assert cold.prompt_cache is None and cold.stats["reused"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_keystroke_in_the_row_its_last_one_left_copies_nothing(model, backend):
    """The row a request leaves still holds its prompt's keys and values; the next keystroke's
    prompt, which lands there, keeps them and copies nothing from the pool (but where the
    static-shape step's padding writes into free rows). Once another prompt took the row,
    the pool supplies the prefix again."""
    net, tok = model
    cold, warm = engine_for(model, backend, mb=0), engine_for(model, backend)
    loads, load = [], warm.prompt_cache.load

    def recorded(key, cache, row, length, begin=0):
        loads.append((begin, length))
        load(key, cache, row, length, begin)

    warm.prompt_cache.load = recorded
    run(warm, tok.encode(BUFFER))
    for typed in KEYSTROKES:
        ids = tok.encode(BUFFER + typed)
        assert run(warm, ids) == run(cold, ids)
    assert len(loads) == len(KEYSTROKES) if backend == "static" else loads == []
    run(warm, tok.encode("x = 1\n" * 5))
    ids = tok.encode(BUFFER + KEYSTROKES[-1] + "\n")
    assert run(warm, ids) == run(cold, ids)
    assert loads[-1][0] == 0 and loads[-1][1] > len(ids) // 2


@pytest.mark.parametrize("speculate", [0, 4])
@pytest.mark.parametrize("backend", [NATIVE, pytest.param(PLAIN, id="plain")])
def test_rows_moved_copied_and_speculated_keep_what_they_hold(model, backend, speculate):
    """What the engine says a row holds follows the row: two requests at once, the first to
    finish leaving its row to the other (moved into it), n samples (copied rows), drafts
    checked in the rows; every later prompt, landing in a row that holds a prefix of it,
    gives the cold tokens."""
    net, tok = model
    cold = engine_for(model, backend, mb=0, speculate=speculate)
    warm = engine_for(model, backend, speculate=speculate)
    short, long = tok.encode("import os\n"), tok.encode(BUFFER)
    p = SamplingParams(max_new_tokens=2, stop_at_eod=False)
    warm.add([Sequence(list(short), p, tok, sample_generator(7, 0, 0))])  # row 0
    run_long = [Sequence(list(long), SamplingParams(max_new_tokens=12, stop_at_eod=False), tok,
                         sample_generator(7, 0, 0))]
    warm.add(run_long)  # row 1, moved into row 0 once the short one finishes
    while warm.rows:
        warm.step()
    assert [list(h) if h is not None else None for h in warm.held[:2]] == [long, long]
    for typed, n in zip(KEYSTROKES, (1, 2, 3, 1)):
        ids = tok.encode(BUFFER + typed)
        assert run(warm, ids, n=n) == run(cold, ids, n=n), (typed, n)
        assert all(list(h) == ids for h in warm.held[:n])
    ids = tok.encode(BUFFER + KEYSTROKES[1])  # a deleting keystroke: shorter than what the rows hold
    assert run(warm, ids, n=2) == run(cold, ids, n=2)


def test_a_failed_prefill_leaves_its_row_trusted_for_nothing(model):
    """A prefill that fails half way (here: after the pool's copy, in the model) has written
    parts of two prompts into its row: the row is trusted for neither, and the next prompt
    there is built from the pool or from scratch, giving the cold tokens."""
    net, tok = model
    cold, warm = engine_for(model, PLAIN, mb=0), engine_for(model, PLAIN)
    run(warm, tok.encode(BUFFER))
    run(warm, tok.encode("x = 1\n" * 5))  # row 0 holds this; the pool holds both
    real = warm.model.forward

    def failing(*a, **kw):
        raise RuntimeError("out of memory")

    warm.model.forward = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        warm.add([Sequence(tok.encode(BUFFER + "#"), SamplingParams(max_new_tokens=1), tok, None)])
    warm.model.forward = real
    assert warm.held[0] is None
    ids = tok.encode("x = 1\n" * 5 + "y")
    assert run(warm, ids) == run(cold, ids)


def test_typing_grows_one_entry_in_place(model):
    """A keystroke's prompt rewrites the entry of the one before where they differ, in the room
    the entry was made with: the same storage, no new bytes; a prompt past that room gets a
    new, larger entry in its place."""
    net, tok = model
    warm = engine_for(model, PLAIN)
    pool = warm.prompt_cache
    run(warm, tok.encode(BUFFER), max_new=1)
    (entry,) = pool.entries.values()
    storage, nbytes = entry.kv.data_ptr(), pool.nbytes
    assert entry.kv.size(3) >= len(entry.ids) + 16  # room to grow
    for typed in KEYSTROKES:
        ids = tok.encode(BUFFER + typed)
        run(warm, ids, max_new=1)
        (entry,) = pool.entries.values()
        assert list(entry.ids) == ids and entry.kv.data_ptr() == storage and pool.nbytes == nbytes
    # what it holds is what a cold prefill of the last prompt writes
    cold = engine_for(model, PLAIN, mb=0)
    cold.prefill(ids, 0)
    with torch.no_grad():
        for layer, (k, v) in enumerate(zip(cold.cache.k, cold.cache.v)):
            torch.testing.assert_close(entry.kv[0, layer, :, : len(ids)], k[0, :, : len(ids)], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(entry.kv[1, layer, :, : len(ids)], v[0, :, : len(ids)], rtol=1e-4, atol=1e-5)
    shorter = tok.encode(BUFFER + KEYSTROKES[-1][:-1])  # a deleting keystroke: the entry is cut back, in place
    run(warm, shorter, max_new=1)
    (entry,) = pool.entries.values()
    assert list(entry.ids) == shorter and entry.kv.data_ptr() == storage and pool.nbytes == nbytes
    longer = ids + tok.encode("\n" + "        x = 1\n" * 12)
    run(warm, longer, max_new=1)
    (entry,) = pool.entries.values()
    assert list(entry.ids) == longer and entry.kv.size(3) >= len(longer) and pool.nbytes > nbytes
    assert pool.nbytes == sum(e.nbytes for e in pool.entries.values()) <= pool.max_bytes
    assert entry.kv.size(3) <= warm.max_len  # never more room than the engine's cache has


@pytest.mark.skipif(not kernels.available(), reason="native kernels off or not built")
def test_a_short_rest_runs_in_one_native_call_as_the_prefill_computes_it(model):
    """The native decode step's `extend`: the few tokens after a cached prefix through every
    block in one call, into any cache row, with the logits a layer-by-layer prefill gives
    (fp32: sums in another order, ~1e-5 relative); more positions than the kernels take are
    left to the prefill (None)."""
    from polycoder.backend.decode import prefill
    from polycoder.generation.engine import CacheRows

    net, tok = model
    ids = tok.encode(BUFFER)
    plain = engine_for(model, PLAIN, mb=0)
    native = engine_for(model, Backend(native_kernels=True), mb=0)  # last: its step sets the weights' layout
    for rest in (1, 3, kernels.MAX_ROWS):
        start, row = len(ids) - rest, 2
        with torch.inference_mode():
            for e in (native, plain):
                prefill(net, torch.tensor([ids[:start]]), CacheRows(e.cache, row, row + 1), e.prefill_ops)
            got = native.decode_step.extend(torch.tensor([ids[start:]]), torch.arange(start, len(ids))[None], row)
            want = prefill(net, torch.tensor([ids[start:]]), CacheRows(plain.cache, row, row + 1), plain.prefill_ops,
                           start=start)
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
        for a, b in zip(native.cache.k, plain.cache.k):  # the keys were written where the prefill writes them
            torch.testing.assert_close(a[row, :, : len(ids)], b[row, :, : len(ids)], rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        too_many = kernels.MAX_ROWS + 1
        assert native.decode_step.extend(torch.tensor([ids[:too_many]]), torch.arange(too_many)[None], 0) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_prefix_is_reused_in_part(model, backend):
    net, tok = model
    cold, warm = engine_for(model, backend, mb=0), engine_for(model, backend)
    a = tok.encode(BUFFER + "        print(k)\n")
    b = a[:60] + tok.encode("    x = compute(y)\n    return x\n")
    run(warm, a)
    before = warm.stats["prefilled"]
    assert run(warm, b) == run(cold, b)
    assert warm.stats["prefilled"] - before == len(b) - 60  # only what follows the shared 60 tokens ran
    assert len(warm.prompt_cache) == 2  # b does not extend a: both stay


def test_the_same_prompt_again_runs_only_its_last_token(model):
    net, tok = model
    warm = engine_for(model, PLAIN)
    ids = tok.encode(BUFFER)
    first = run(warm, ids)
    before = warm.stats["prefilled"]
    assert run(warm, ids) == first
    assert warm.stats["prefilled"] - before == 1  # the last token runs again, for its logits


def test_reuse_false_runs_every_token_and_still_stores_the_prompt(model):
    """llama.cpp's `cache_prompt: false` for one request: nothing reused, the same tokens, and
    the prompt kept for the requests after it."""
    net, tok = model
    warm = engine_for(model, PLAIN)
    ids = tok.encode(BUFFER)
    first = run(warm, ids)
    seqs = [Sequence(list(ids), SamplingParams(max_new_tokens=16, stop_at_eod=False), tok, sample_generator(7, 0, 0))]
    assert warm.add(seqs, reuse=False) == len(ids)
    while warm.rows:
        warm.step()
    assert seqs[0].token_ids == first[0] and warm.prompt_cache.stats["hits"] == 0  # no lookup: no hit
    assert warm.add([Sequence(list(ids), SamplingParams(max_new_tokens=1), tok, None)]) == 1


def test_the_pool_stays_within_its_bytes_and_evicts_the_least_recently_used(model):
    net, tok = model
    per_token = kv_bytes_per_token(net)
    prompts = [tok.encode(f"# file {i}\n" + "x = 1\n" * (10 + i)) for i in range(6)]
    bound = per_token * (len(prompts[0]) + len(prompts[1]) + 5)  # room for about two prompts
    engine = engine_for(model, PLAIN, mb=bound / 2**20)
    pool = engine.prompt_cache
    run(engine, prompts[0], max_new=2)
    run(engine, prompts[1], max_new=2)
    run(engine, prompts[0] + tok.encode("y"), max_new=2)  # prompt 0's chain used again: now the newest
    run(engine, prompts[2], max_new=2)
    assert pool.nbytes <= pool.max_bytes and pool.stats["evictions"] >= 1
    kept = [list(e.ids) for e in pool.entries.values()]
    assert prompts[1] not in kept and prompts[2] in kept  # the least recently used went first
    for p in prompts[3:]:
        run(engine, p, max_new=2)
        assert pool.nbytes <= pool.max_bytes
    # a prompt larger than the whole pool is not kept (and evicts nothing)
    n = len(pool)
    run(engine, tok.encode("z = 2\n" * 60), max_new=2)
    assert len(pool) == n and pool.nbytes == sum(e.nbytes for e in pool.entries.values())


def test_a_pool_size_below_zero_is_refused(model):
    net, tok = model
    with pytest.raises(PolycoderError, match="prompt cache"):
        Engine(net, tok, max_rows=1, max_len=64, prompt_cache_mb=-1)
    with pytest.raises(ValueError, match=">= 0"):
        PromptCache(-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_samples_copy_the_reused_prefill(model, backend):
    net, tok = model
    cold, warm = engine_for(model, backend, mb=0), engine_for(model, backend)
    run(warm, tok.encode(BUFFER))
    ids = tok.encode(BUFFER + KEYSTROKES[1])
    greedy = run(warm, ids, n=3)
    assert greedy == run(cold, ids, n=3) and greedy[0] == greedy[1] == greedy[2]
    sampled = run(warm, ids + [tok.encode(" ")[0]], n=3, temperature=0.8, top_k=40)
    assert len(sampled) == 3 and len({tuple(s) for s in sampled}) > 1  # three samples, not one copied
    assert warm.prompt_cache.stats["hits"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_joining_and_leaving_with_cached_prefixes(model, backend):
    """Prompts sharing and not sharing prefixes, in one running batch, each equal to its cold run."""
    net, tok = model
    cold, warm = engine_for(model, backend, mb=0), engine_for(model, backend, rows=4)
    run(warm, tok.encode(BUFFER))
    prompts = [tok.encode(BUFFER + k) for k in KEYSTROKES] + [tok.encode("int main(void) {\n    return")]
    expected = [run(cold, p, max_new=8 + 3 * i)[0] for i, p in enumerate(prompts)]
    p = [SamplingParams(max_new_tokens=8 + 3 * i, stop_at_eod=False) for i in range(len(prompts))]
    seqs = [Sequence(ids, p[i], tok, sample_generator(7, 0, 0)) for i, ids in enumerate(prompts)]
    waiting = list(seqs)
    while waiting or warm.rows:
        if waiting and warm.free_rows:
            warm.add([waiting.pop(0)])
        warm.step()
    assert [s.token_ids for s in seqs] == expected
    assert warm.prompt_cache.stats["hits"] >= len(KEYSTROKES)


def test_a_cancelled_row_leaves_its_prompt_cached_and_its_row_free(model):
    net, tok = model
    warm = engine_for(model, PLAIN, rows=1)
    ids = tok.encode(BUFFER)
    p = SamplingParams(max_new_tokens=50)
    warm.add([Sequence(ids, p, tok, sample_generator(7, 0, 0))])  # cancelled right after its prefill
    assert warm.cancel(lambda s: True) and warm.free_rows == 1
    warm.add([Sequence(ids + [5], p, tok, sample_generator(7, 0, 0))])
    warm.step()
    warm.step()  # cancelled mid-decode
    assert warm.cancel(lambda s: True) and warm.free_rows == 1
    before = warm.stats["reused"]
    assert run(warm, ids + [5, 6]) == run(engine_for(model, PLAIN, mb=0), ids + [5, 6])
    assert warm.stats["reused"] - before == len(ids) + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_speculation_with_a_draft_model_is_unchanged_by_the_cache(model, tiny_config, backend):
    from polycoder.checkpoint import build_model

    net, tok = model
    draft = build_model(tiny_config, seed=5).eval()  # another model: its guesses are often rejected
    cold = engine_for(model, backend, mb=0)
    warm = engine_for(model, backend, speculate=3, draft_model=draft)
    itself = engine_for(model, backend, speculate=3, draft_model=net)  # every guess kept
    lookup = engine_for(model, backend, speculate=3)  # prompt lookup: no cache of its own
    assert warm.drafter.pool is not None and warm.drafter.pool.max_bytes > 0
    assert warm.prompt_cache.max_bytes + warm.drafter.pool.max_bytes == 64 * 2**20  # one bound for both
    for text in [BUFFER, BUFFER + KEYSTROKES[1], BUFFER + KEYSTROKES[3]]:
        ids = tok.encode(text)
        plain = run(cold, ids, max_new=16)
        assert run(warm, ids, max_new=16) == plain
        assert run(itself, ids, max_new=16) == plain
        assert run(lookup, ids, max_new=16) == plain
    assert warm.stats["drafted"] > 0 and itself.stats["accepted"] > 0
    assert warm.drafter.pool.stats["hits"] == 2 and warm.prompt_cache.stats["hits"] == 2


def test_fim_prompts_spm_keeps_the_prompt_cached_psm_recomputes_after_the_cursor(model):
    """Typing at the cursor of an FIM prompt: in SPM order (the prefix last) only the typed
    tail runs again; in PSM the suffix follows the prefix, so it runs again every keystroke."""
    from polycoder.fim import arrange

    net, tok = model
    fim = tok.with_fim_tokens().fim
    assert max(fim.prefix, fim.middle, fim.suffix, fim.pad) < net.config.vocab_size
    before, after = BUFFER, "\n\nif __name__ == '__main__':\n    main(sys.argv)\n"
    suffix = tok.encode(after)
    computed = {}
    for order in ("spm", "psm"):
        cold, warm = engine_for(model, PLAIN, mb=0), engine_for(model, PLAIN)
        run(warm, arrange(fim, tok.encode(before), [], suffix, order), max_new=4)
        start = warm.stats["prefilled"]
        for typed in KEYSTROKES:
            ids = arrange(fim, tok.encode(before + typed), [], suffix, order)
            assert run(warm, ids, max_new=4) == run(cold, ids, max_new=4)
        computed[order] = (warm.stats["prefilled"] - start) / len(KEYSTROKES)
    assert computed["spm"] < 10 and computed["psm"] > len(suffix)


def test_bf16_keystrokes_are_close_to_cold(tiny_folder):
    """bf16 sums in other block shapes round otherwise (the module says why): not a token
    for token promise, but the cached prefill's logits stay within bf16's rounding."""
    net, tok = load_model(tiny_folder, dtype="bfloat16")
    cold = Engine(net, tok, max_rows=1, max_len=256, backend=PLAIN)
    warm = Engine(net, tok, max_rows=1, max_len=256, backend=PLAIN, prompt_cache_mb=16)
    warm.prefill(tok.encode(BUFFER), 0)
    ids = tok.encode(BUFFER + KEYSTROKES[-1])
    a, b = cold.prefill(ids, 0), warm.prefill(ids, 0)
    assert warm.stats["reused"] > 0
    torch.testing.assert_close(b, a, atol=0.1, rtol=0.05)


# ---- the server ------------------------------------------------------------------------------

def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{name}(?:_total)? ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def complete(server: Server, prompt, max_tokens: int = 12, **kw) -> list[str]:
    r = post(server, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


@pytest.fixture(scope="module")
def servers(tiny_folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs")
    on = Server(tiny_folder, "--max-batch-size", "4", log=log / "on.log")
    off = Server(tiny_folder, "--max-batch-size", "4", "--prompt-cache-mb", "0", log=log / "off.log")
    yield on, off
    on.stop()
    off.stop()


@pytest.mark.slow
def test_server_keystrokes_give_the_cold_answers_and_count_hits(servers, code_tokenizer):
    on, off = servers
    hits, saved = metric(on, "polycoder_prompt_cache_hits"), metric(on, "polycoder_prefill_reused_tokens")
    for typed in [""] + KEYSTROKES:
        assert complete(on, BUFFER + typed) == complete(off, BUFFER + typed)
    assert metric(on, "polycoder_prompt_cache_hits") - hits >= len(KEYSTROKES)
    assert metric(on, "polycoder_prefill_reused_tokens") - saved >= len(KEYSTROKES) * (len(code_tokenizer.encode(BUFFER)) - 1)
    assert metric(on, "polycoder_prompt_cache_entries") >= 1 and metric(on, "polycoder_prompt_cache_bytes") > 0
    # token-id prompts too (an FIM-arranged prompt is one), and n > 1 samples
    ids = code_tokenizer.encode(BUFFER + KEYSTROKES[0])
    assert complete(on, ids, n=3) == complete(off, ids, n=3)
    # cache off: nothing reused, every prompt token prefilled, no hits
    assert metric(off, "polycoder_prefill_reused_tokens") == 0 and metric(off, "polycoder_prompt_cache_hits") == 0
    assert metric(off, "polycoder_prefill_tokens") > 0 and metric(off, "polycoder_prompt_cache_bytes") == 0


@pytest.mark.slow
def test_server_usage_counts_cached_tokens_only_with_the_cache_on(servers, code_tokenizer):
    on, off = servers
    n = len(code_tokenizer.encode(BUFFER))
    for s in servers:
        complete(s, BUFFER, max_tokens=1)
    typed = {"prompt": BUFFER + KEYSTROKES[0], "max_tokens": 1, "temperature": 0}
    u = post(on, typed).json()["usage"]
    assert n - 2 <= u["prompt_tokens_details"]["cached_tokens"] < u["prompt_tokens"]
    assert post(off, typed).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.slow
def test_server_concurrent_clients_sharing_and_not_sharing_prefixes(servers):
    on, off = servers
    prompts = [BUFFER + k for k in KEYSTROKES] + ["#include <stdio.h>\nint main(void) {\n", "def f(x):\n    return"] * 2
    expected = [complete(off, p, max_tokens=10) for p in prompts]
    got: dict[int, list] = {}

    def client(i: int) -> None:
        got[i] = complete(on, prompts[i], max_tokens=10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == expected
    still_serves(on)


def wait_for(server: Server, name: str, value: float, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while metric(server, name) != value:
        assert time.time() < deadline, f"{name} stayed at {metric(server, name)}, expected {value}"
        time.sleep(0.05)


@pytest.mark.slow
def test_server_cancelled_requests_free_their_rows_and_leave_their_prompt(servers, code_tokenizer):
    on, off = servers
    for cut in ("after the headers", "after the first token"):
        prompt = BUFFER + f"        # {cut}\n"
        body = json.dumps({"prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", on.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            seen = b""
            while b"\r\n\r\n" not in seen or (cut.endswith("token") and b"data:" not in seen):
                got = s.recv(4096)
                assert got, f"the server closed the stream early: {seen[-500:]!r}"
                seen += got
            assert seen.startswith(b"HTTP/1.1 200"), seen[:500]
        wait_for(on, "polycoder_active_rows", 0)
        saved = metric(on, "polycoder_prefill_reused_tokens")
        assert complete(on, prompt + "x") == complete(off, prompt + "x")
        if cut.endswith("token"):  # certainly prefilled before the client left: its prompt is reused
            assert metric(on, "polycoder_prefill_reused_tokens") - saved >= len(code_tokenizer.encode(prompt)) - 1
    assert metric(on, "polycoder_cancelled_rows") >= 1
    still_serves(on)


@pytest.mark.slow
def test_server_pool_bound_and_evictions(tiny_folder):
    # 1 KiB a token here (keys and values, 2 layers, 64 wide, fp32): 0.2 MB holds about 200 tokens
    s = Server(tiny_folder, "--prompt-cache-mb", "0.2")
    try:
        for i in range(8):
            complete(s, f"# file {i}\n" + "value = compute(value)\n" * 12, max_tokens=2)
        assert 0 < metric(s, "polycoder_prompt_cache_bytes") <= 0.2 * 2**20
        assert metric(s, "polycoder_prompt_cache_evictions") >= 1
        still_serves(s)
    finally:
        s.stop()


def test_serve_refuses_a_negative_pool(tiny_folder):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "polycoder", "serve", "--model", str(tiny_folder),
                        "--prompt-cache-mb", "-1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--prompt-cache-mb must be >= 0" in r.stderr
