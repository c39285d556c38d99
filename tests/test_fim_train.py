"""Fill-in-the-middle training: the transform of windows, the loader with it, `finetune --fim`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_helpers import cli_env, one_and_two_processes, polycoder_cmd, run_cli

from polycoder.checkpoint import build_model, grow_vocabulary, load_model, load_weights, save_checkpoint
from polycoder.config import ModelConfig
from polycoder.errors import PolycoderError
from polycoder.fim import arrange
from polycoder.token_shards import write_shard
from polycoder.tokenizer import Tokenizer
from polycoder.train import checkpointing as ckpt
from polycoder.train.distributed import Dist
from polycoder.train.fim_transform import MAX_SPAN_LINES, FimTransform, line_span, make_fim_transform
from polycoder.train.finetune import finetune
from polycoder.train.loader import WindowLoader, open_split
from polycoder.train.loop import Trainer
from polycoder.train.metrics import read_metrics
from polycoder.train.settings import DataSettings, load_settings

CODE = [
    "def add(a, b):\n    return a + b\n",
    "def mul(a, b):\n    return a * b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]
DOC = "def area(r):\n    # the circle's area\n    return 3.14159 * r * r\n"


@pytest.fixture(scope="module")
def fim_tok(code_tokenizer) -> Tokenizer:
    return code_tokenizer.with_fim_tokens()


def byte_ids(tok: Tokenizer, data: bytes) -> np.ndarray:
    """One token a byte: a piece whose re-tokenization is shorter, so the transform pads it."""
    return np.array([i for b in data for i in tok.encode(bytes([b]))], dtype=np.int64)


def split_psm(out: list[int], fim) -> tuple[list[int], list[int], list[int]]:
    assert out[0] == fim.prefix
    s, m = out.index(fim.suffix), out.index(fim.middle)
    return out[1:s], out[s + 1:m], out[m + 1:]


# ---- the transform of one piece ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_psm_layout_parts_tokenized_alone_rejoin_to_the_document(fim_tok, seed):
    t = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.0, seed=0)
    ids = byte_ids(fim_tok, DOC.encode())
    out = t.piece(ids, np.random.default_rng(seed)).tolist()
    assert len(out) == len(ids)
    prefix, suffix_padded, middle = split_psm(out, fim_tok.fim)
    n_pad = len(suffix_padded) - len(suffix := [i for i in suffix_padded if i != fim_tok.fim.pad])
    assert suffix_padded == suffix + [fim_tok.fim.pad] * n_pad and n_pad > 0  # pads close the suffix
    p, m, s = (fim_tok.decode(x) for x in (prefix, middle, suffix))
    assert p + m + s == DOC
    for part, text in ((prefix, p), (middle, m), (suffix, s)):
        assert part == fim_tok.encode(text)  # each part tokenized on its own
    assert out == arrange(fim_tok.fim, prefix, middle, suffix + [fim_tok.fim.pad] * n_pad, "psm")


@pytest.mark.parametrize("seed", range(6))
def test_spm_layout(fim_tok, seed):
    fim = fim_tok.fim
    t = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=1.0, seed=0)
    ids = byte_ids(fim_tok, DOC.encode())
    out = t.piece(ids, np.random.default_rng(seed)).tolist()
    assert len(out) == len(ids) and out[:2] == [fim.prefix, fim.suffix]
    m = out.index(fim.middle)
    suffix = [i for i in out[2:m] if i != fim.pad]
    assert out[2:m] == suffix + [fim.pad] * (m - 2 - len(suffix))
    prefix_then_middle = fim_tok.decode(out[m + 1:])
    assert prefix_then_middle + fim_tok.decode(suffix) == DOC
    assert suffix == fim_tok.encode(fim_tok.decode(suffix))


def test_layout_is_exactly_the_drawn_cut(fim_tok):
    """The draws, in their order: apply FIM?, two cut points, SPM?; then arrange and pad."""
    t = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.5, seed=0)
    ids = byte_ids(fim_tok, DOC.encode())
    for seed in range(8):
        out = t.piece(ids, np.random.default_rng(seed)).tolist()
        rng = np.random.default_rng(seed)
        rng.random()
        lo, hi = sorted(rng.integers(0, len(DOC) + 1, size=2).tolist())
        order = "spm" if rng.random() < 0.5 else "psm"
        p, m, s = (fim_tok.encode(x) for x in (DOC[:lo], DOC[lo:hi], DOC[hi:]))
        pad = [fim_tok.fim.pad] * (len(ids) - len(p) - len(m) - len(s) - 3)
        assert out == arrange(fim_tok.fim, p, m, s + pad, order)


def test_a_longer_rearrangement_cuts_the_suffix(fim_tok):
    """Canonical tokens: re-tokenizing the parts adds the three sentinels and maybe more;
    the suffix gives up that many tokens from its end, so the piece keeps its length."""
    t = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.0, seed=0)
    text = DOC * 3
    ids = np.array(fim_tok.encode(text))
    changed = 0
    for seed in range(10):
        out = t.piece(ids, np.random.default_rng(seed)).tolist()
        assert len(out) == len(ids)
        if out == ids.tolist():
            continue  # a suffix too short to give up the excess: left alone
        changed += 1
        prefix, suffix, middle = split_psm(out, fim_tok.fim)
        assert fim_tok.fim.pad not in suffix
        joined = fim_tok.decode(prefix) + fim_tok.decode(middle) + fim_tok.decode(suffix)
        assert text.startswith(fim_tok.decode(prefix) + fim_tok.decode(middle)) and len(joined) < len(text)
    assert changed >= 5


def test_bytes_that_are_not_utf8_survive(fim_tok):
    data = "naïve = 'ü'\n".encode()[3:] + b"\xff\xfe bin \xc3( \x80\n" + "x = 'é'\n".encode()[:-3]
    ids = np.array(fim_tok.encode(data))
    assert fim_tok.decode_bytes(ids.tolist()) == data  # starts and ends inside a character
    t = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.0, seed=0)
    byte_level = byte_ids(fim_tok, data)
    for seed in range(10):
        out = t.piece(byte_level, np.random.default_rng(seed)).tolist()
        prefix, suffix, middle = split_psm(out, fim_tok.fim)
        suffix = [i for i in suffix if i != fim_tok.fim.pad]
        assert b"".join(fim_tok.decode_bytes(x) for x in (prefix, middle, suffix)) == data


def test_short_pieces_and_pieces_with_special_tokens_are_left_alone(fim_tok):
    t = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.5, seed=0)
    rng = np.random.default_rng(0)
    for ids in ([fim_tok.encode("x")[0]], fim_tok.encode("ab")[:2]):
        for _ in range(5):
            assert t.piece(np.array(ids), rng).tolist() == list(ids)
    with_special = np.array(fim_tok.encode("x = 1\n") + [fim_tok.pad_id] + fim_tok.encode("y = 2\n"))
    assert t.piece(with_special, rng).tolist() == with_special.tolist()
    already = np.array(arrange(fim_tok.fim, fim_tok.encode("a = "), fim_tok.encode("1"), fim_tok.encode("\n"), "psm"))
    assert t.piece(already, rng).tolist() == already.tolist()


def test_window_keeps_each_eod_in_place(fim_tok):
    t = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.5, seed=0)
    eod = fim_tok.eod_id
    pieces = [byte_ids(fim_tok, c.encode()) for c in CODE]
    window = np.concatenate([np.concatenate([p, [eod]]) for p in pieces])[:-5]  # the last piece cut
    out = t.window(window, np.random.default_rng(0))
    assert len(out) == len(window)
    assert np.flatnonzero(out == eod).tolist() == np.flatnonzero(window == eod).tolist()
    starts = [0, *(np.flatnonzero(window == eod) + 1).tolist()]
    assert all(out[s] == fim_tok.fim.prefix for s in starts)  # every piece rearranged at rate 1


def test_a_batch_tokenized_at_once_equals_window_by_window(fim_tok):
    t = FimTransform(fim_tok, fim_rate=0.7, fim_spm_rate=0.5, seed=4)
    eod = fim_tok.eod_id
    docs = [fim_tok.encode(c * 2) + [eod] for c in CODE] + [byte_ids(fim_tok, "naïve\xff".encode("latin-1")).tolist()]
    stream = np.concatenate([np.asarray(d) for d in docs * 3])
    windows = np.stack([stream[i:i + 60] for i in range(0, 240, 40)])
    batch = t.rows(windows, step=3, rows=range(10, 16))
    for i, w in enumerate(windows):
        assert batch[i].tolist() == t.window(w, t.rng(3, 10 + i)).tolist()
    assert not np.array_equal(batch, windows)


def test_rates_are_honoured(fim_tok):
    t = FimTransform(fim_tok, fim_rate=0.3, fim_spm_rate=0.7, seed=0)
    ids = byte_ids(fim_tok, DOC.encode())
    rng = np.random.default_rng(123)
    outs = [t.piece(ids, rng) for _ in range(3000)]
    fim = [o for o in outs if o[0] == fim_tok.fim.prefix]
    spm = [o for o in fim if o[1] == fim_tok.fim.suffix]
    assert abs(len(fim) / len(outs) - 0.3) < 0.03  # about 4 standard deviations
    assert abs(len(spm) / len(fim) - 0.7) < 0.05


SOURCE = "class Point:\n    def __init__(self, x, y):\n        self.x = x\n\n        self.y = y\n    def norm(self):\n" \
         "        return (self.x ** 2 + self.y ** 2) ** 0.5\n"


@pytest.mark.parametrize("text", [SOURCE, SOURCE.rstrip("\n"), "x = 1", "\n\n  \n"])
def test_line_spans_are_one_to_three_lines_from_a_backed_off_cursor(text):
    """A line span ends at a line's end (after its newline for whole lines, before it from a
    cursor mid-line); its start is where back_off puts a cursor (no whitespace before it) at
    or before the drawn line; it covers at most MAX_SPAN_LINES lines besides the whitespace
    the back-off takes in."""
    shapes = set()
    for seed in range(400):
        lo, hi = line_span(text, np.random.default_rng(seed))
        assert 0 <= lo <= hi <= len(text)
        assert lo == 0 or not text[lo - 1].isspace()
        assert hi == len(text) or text[hi] == "\n" or text[hi - 1] == "\n"
        middle = text[lo:hi]
        assert middle.lstrip().count("\n") <= MAX_SPAN_LINES
        shapes.add((hi == len(text) or text[hi - 1] == "\n", middle.lstrip().count("\n")))
    if text == SOURCE:  # both kinds of span, of 1 to 3 lines, are drawn
        assert {(True, 1), (True, 2), (True, 3), (False, 0), (False, 1), (False, 2)} <= shapes


def test_line_rate_cuts_middles_at_lines_and_zero_draws_as_before(fim_tok):
    ids = byte_ids(fim_tok, SOURCE.encode())
    plain = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.5, seed=0)
    zero = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.5, seed=0, fim_line_rate=0.0)
    lines = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.0, seed=0, fim_line_rate=1.0)
    for seed in range(20):
        assert (zero.piece(ids, np.random.default_rng(seed)).tolist()
                == plain.piece(ids, np.random.default_rng(seed)).tolist())
        out = lines.piece(ids, np.random.default_rng(seed)).tolist()
        rng = np.random.default_rng(seed)
        rng.random(), rng.random()  # apply FIM?, a line span?
        lo, hi = line_span(SOURCE, rng)
        prefix, suffix, middle = split_psm(out, fim_tok.fim)
        assert fim_tok.decode(prefix) == SOURCE[:lo] and fim_tok.decode(middle) == SOURCE[lo:hi]
        assert SOURCE[hi:].startswith(fim_tok.decode([i for i in suffix if i != fim_tok.fim.pad]))
    mixed = FimTransform(fim_tok, fim_rate=1.0, fim_spm_rate=0.0, seed=0, fim_line_rate=0.5)
    cut_at_lines = 0
    for seed in range(2000):
        prefix, suffix, middle = split_psm(mixed.piece(ids, np.random.default_rng(seed)).tolist(), fim_tok.fim)
        hi = len(fim_tok.decode(prefix)) + len(fim_tok.decode(middle))
        cut_at_lines += hi == len(SOURCE) or SOURCE[hi] == "\n" or SOURCE[hi - 1] == "\n"
    # line spans (half) always end at a line; a uniform cut does so about 10 % of the time
    assert 0.5 < cut_at_lines / 2000 < 0.62


def test_rate_needs_the_sentinels_and_defaults_to_them(code_tokenizer, fim_tok):
    with pytest.raises(PolycoderError, match="finetune --fim"):
        make_fim_transform(code_tokenizer, DataSettings(fim_rate=0.5))
    assert make_fim_transform(code_tokenizer, DataSettings()) is None  # auto: left-to-right tokenizer, no FIM
    assert make_fim_transform(fim_tok, DataSettings()).fim_rate == 0.5  # auto: sentinels, StarCoder's rate
    assert make_fim_transform(fim_tok, DataSettings(fim_rate=0.0)) is None
    line = make_fim_transform(fim_tok, DataSettings(fim_spm_rate=0.25, fim_line_rate=0.5, seed=3))
    assert (line.fim_spm_rate, line.fim_line_rate, line.seed) == (0.25, 0.5, 3)
    with pytest.raises(PolycoderError, match="data.fim_rate must be in"):
        load_settings(None, None, ["data.fim_rate=1.5"])
    with pytest.raises(PolycoderError, match="data.fim_spm_rate must be in"):
        load_settings(None, None, ["data.fim_spm_rate=-0.1"])
    with pytest.raises(PolycoderError, match="data.fim_line_rate must be in"):
        load_settings(None, None, ["data.fim_line_rate=2"])
    assert load_settings(None, None, ["data.fim_rate=1"]).data.fim_rate == 1.0


# ---- the loader ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream(fim_tok) -> np.ndarray:
    docs = [byte_ids(fim_tok, (CODE[i % 4] * (1 + i % 3)).encode()).tolist() + [fim_tok.eod_id] for i in range(80)]
    return np.concatenate(docs).astype(np.uint16)


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_loader_batches_are_a_function_of_seed_and_step_and_split_across_ranks(fim_tok, stream, sampling):
    def loader(seed=7):
        return WindowLoader([stream], 48, 8, sampling, seed, transform=FimTransform(fim_tok, 0.5, 0.5, seed))

    a, b = loader(), loader()
    for step in (0, 3, 11):
        x, y = a.global_batch(step)
        x2, y2 = b.global_batch(step)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        # 2 ranks x 2 accumulation steps of 2 rows: the same rows as one process takes
        parts = [a.micro_batch(step, r, 2, 2, m) for m in range(2) for r in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not torch.equal(a.global_batch(1)[0], a.global_batch(2)[0])
    assert not torch.equal(a.global_batch(1)[0], loader(seed=8).global_batch(1)[0])
    xs = torch.cat([a.global_batch(s)[0] for s in range(10)])
    assert (xs == fim_tok.fim.prefix).any() and (xs == fim_tok.fim.pad).any()


def test_pad_targets_are_ignored(fim_tok, stream):
    ld = WindowLoader([stream], 48, 8, "random", 0, transform=FimTransform(fim_tok, 1.0, 0.5, 0))
    plain = WindowLoader([stream], 48, 8, "random", 0)
    x, y = ld.global_batch(5)
    assert not (y == fim_tok.fim.pad).any()
    # the targets are the inputs shifted, with each <fim_pad> replaced by -100
    assert torch.equal(torch.where(x[:, 1:] == fim_tok.fim.pad, -100, x[:, 1:]), y[:, :-1])
    assert (y == -100).any()
    assert not torch.equal(plain.global_batch(5)[0], x)
    assert plain.state.fim_rate == 0.0 and ld.state.fim_rate == 1.0


# ---- growing the vocabulary and finetune --fim ---------------------------------------------


@pytest.fixture(scope="module")
def full_base(tmp_path_factory, code_tokenizer) -> Path:
    """A tiny model whose embedding has exactly the tokenizer's 8192 rows: the sentinels need new ones."""
    folder = tmp_path_factory.mktemp("fimbase") / "tiny"
    cfg = ModelConfig.from_preset("test-tiny").replace(vocab_size=code_tokenizer.vocab_size)
    save_checkpoint(build_model(cfg, seed=0), code_tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fimdata") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": CODE[i % 4] * (1 + i % 3)}) + "\n" for i in range(60)))
    return path


def test_grow_vocabulary_mean_rows_and_padding(full_base):
    net, tok = load_model(full_base)
    n = tok.vocab_size
    grown = grow_vocabulary(net, n, n + 4)
    assert grown.config.vocab_size == -(-(n + 4) // 64) * 64 == n + 64
    for old, new in ((net.gpt_neox.embed_in.weight, grown.gpt_neox.embed_in.weight),
                     (net.embed_out.weight, grown.embed_out.weight)):
        assert torch.equal(new[:n], old)
        torch.testing.assert_close(new[n:], old.mean(0).expand(64, -1))
    x = torch.randint(0, n, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grown(x)[..., :n], net(x), rtol=0, atol=0)
    # rows already there (PolyCoder: 50257 tokens, 50304 rows) take the new tokens; the tail is kept
    roomy = build_model(ModelConfig.from_preset("test-tiny").replace(vocab_size=384), seed=0)
    g = grow_vocabulary(roomy, 259, 263)
    assert g.config.vocab_size == 384
    assert torch.equal(g.embed_out.weight[263:], roomy.embed_out.weight[263:])
    torch.testing.assert_close(g.embed_out.weight[259:263], roomy.embed_out.weight[:259].mean(0).expand(4, -1))


@pytest.fixture(scope="module")
def fim_run(full_base, jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fimrun")
    assert finetune(model=str(full_base), data=str(jsonl), out=str(out), fim=True, max_steps=15, lr=3e-3,
                    batch_size=4, seq_len=64, dtype="fp32", set=["run.tensorboard=false"]) == 0
    return out


def test_finetune_fim_grows_the_model_and_the_loss_falls(fim_run, code_tokenizer):
    loss = [r["loss"] for r in read_metrics(fim_run / "metrics.jsonl") if "loss" in r]
    assert len(loss) == 15 and loss[-1] < 0.85 * loss[0]
    settings = json.loads((fim_run / "settings.json").read_text())
    assert settings["data"]["fim_rate"] is None and settings["data"]["fim_spm_rate"] == 0.5  # auto: 0.5
    model, tok = load_model(fim_run / "final")
    n = code_tokenizer.vocab_size
    assert tok.fim is not None and (tok.fim.prefix, tok.fim.middle, tok.fim.suffix, tok.fim.pad) == (n, n + 1, n + 2, n + 3)
    assert model.config.vocab_size == n + 64
    assert json.loads((fim_run / "final" / "config.json").read_text())["vocab_size"] == n + 64
    state = json.loads((fim_run / "checkpoints" / "step_00000015" / "training_state" / "state.json").read_text())
    assert state["loader"]["fim_rate"] == 0.5  # a resume with other rates is refused


def test_finetune_fim_result_opens_in_transformers_with_our_logits(fim_run):
    transformers = pytest.importorskip("transformers")
    final = fim_run / "final"
    ours, tok = load_model(final)
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    for name, i in (("<fim_prefix>", tok.fim.prefix), ("<fim_middle>", tok.fim.middle),
                    ("<fim_suffix>", tok.fim.suffix), ("<fim_pad>", tok.fim.pad)):
        assert hf_tok.convert_tokens_to_ids(name) == i
    prompt = "<fim_prefix>def add(a, b):\n<fim_suffix>\n<fim_middle>"
    ids = hf_tok(prompt)["input_ids"]
    assert ids == arrange(tok.fim, tok.encode("def add(a, b):\n"), [], tok.encode("\n"), "psm")
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_fim_rate_without_sentinels_is_a_clear_error(full_base, jsonl, tmp_path):
    with pytest.raises(PolycoderError, match="finetune --fim"):
        finetune(model=str(full_base), data=str(jsonl), out=str(tmp_path), fim_rate=0.5, max_steps=1)


# ---- polycoder train: settings, resume, processes -----------------------------------------


def make_fim_token_dir(root: Path, tokenizer: Tokenizer, n_docs: int = 300, seed: int = 0) -> Path:
    """A token folder as `polycoder data tokenize` writes it, of code texts, with `tokenizer`."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_docs), ("valid", n_docs // 10)):
        docs = [tokenizer.encode("".join(CODE[i] for i in rng.integers(0, 4, size=int(rng.integers(1, 4)))))
                for _ in range(n)]
        (root / split).mkdir(parents=True, exist_ok=True)
        write_shard(root / split / "shard_00000.bin", docs, tokenizer.vocab_size)
    tokenizer.save(root / "tokenizer")
    return root


def fim_settings(**kw):
    base = {"run.max_steps": 12, "data.seq_len": 48, "data.batch_size": 8, "optim.lr": 3e-3, "run.precision": "fp32",
            "run.eval_every": 0, "run.save_every": 0, "run.tensorboard": False, "data.fim_rate": 0.5}
    base.update(kw)
    return load_settings(None, None, base)


@pytest.fixture(scope="module")
def byte_fim() -> Tokenizer:
    return Tokenizer.byte_level().with_fim_tokens()


@pytest.fixture(scope="module")
def byte_fim_stream(byte_fim, tmp_path_factory) -> np.ndarray:
    root = make_fim_token_dir(tmp_path_factory.mktemp("fimtok"), byte_fim)
    arrays, _ = open_split(root, "train")
    return arrays[0]


def tiny_fim_model(seed: int = 0):
    return build_model(ModelConfig.from_preset("test-tiny").replace(vocab_size=384), seed=seed).requires_grad_(True)


def _write(m, folder):
    save_checkpoint(m, Tokenizer.byte_level().with_fim_tokens(), folder)


def test_resume_with_fim_equals_uninterrupted(byte_fim, byte_fim_stream, tmp_path):
    def transform(s):
        return make_fim_transform(byte_fim, s.data)

    s = fim_settings()
    full = Trainer(tiny_fim_model(), s, Dist(), [byte_fim_stream], [], tmp_path / "a", _write, 48,
                   fim=transform(s)).fit()
    s = fim_settings(**{"run.save_every": 5})
    Trainer(tiny_fim_model(), s, Dist(), [byte_fim_stream], [], tmp_path / "b", _write, 48, fim=transform(s)).fit()
    folder = ckpt.checkpoint_dir(tmp_path / "b", 5)
    model = tiny_fim_model(seed=9)
    load_weights(model, folder)
    resumed = Trainer(model, s, Dist(), [byte_fim_stream], [], tmp_path / "b", _write, 48, fim=transform(s)).fit(folder)
    np.testing.assert_allclose(resumed.losses, full.losses[5:], rtol=0, atol=1e-6)
    other = fim_settings(**{"run.save_every": 5, "data.fim_rate": 0.9})
    t = Trainer(tiny_fim_model(), other, Dist(), [byte_fim_stream], [], tmp_path / "b", _write, 48,
                fim=transform(other))
    with pytest.raises(PolycoderError, match="fim_rate"):
        t.load_state(folder)  # other FIM rates: not the run that was saved


def test_accumulated_micro_batches_equal_one_batch_with_fim_padding(byte_fim, byte_fim_stream, tmp_path):
    """The loss is the mean over every counted target of the batch however it is split (the
    micro-batches count different numbers of <fim_pad> targets): 4 x 2 rows = 8 rows."""
    def run(micro, out):
        s = fim_settings(**{"data.micro_batch": micro, "run.max_steps": 6})
        t = Trainer(tiny_fim_model(), s, Dist(), [byte_fim_stream], [], out, _write, 48,
                    fim=make_fim_transform(byte_fim, s.data))  # fim_settings: rate 0.5, SPM 0.5
        return t.fit().losses

    np.testing.assert_allclose(run(2, tmp_path / "a"), run(8, tmp_path / "b"), rtol=0, atol=2e-6)


def test_train_verb_defaults_to_fim_with_sentinels(byte_fim, tmp_path):
    from polycoder.train.pretrain import train

    data = make_fim_token_dir(tmp_path / "tokens", byte_fim, n_docs=120)
    out = tmp_path / "run"
    assert train(data=str(data), out=str(out), preset="test-tiny", max_steps=3, seq_len=32, batch_size=4,
                 dtype="fp32", set=["run.tensorboard=false"]) == 0
    state = json.loads((ckpt.latest_checkpoint(out) / "training_state" / "state.json").read_text())
    assert state["loader"]["fim_rate"] == 0.5 and state["loader"]["fim_spm_rate"] == 0.5
    model, tok = load_model(out / "final")
    assert model.config.vocab_size == 384 and tok.fim == byte_fim.fim
    plain = make_fim_token_dir(tmp_path / "plain", Tokenizer.byte_level(), n_docs=120)
    assert train(data=str(plain), out=str(tmp_path / "ltr"), preset="test-tiny", max_steps=1, seq_len=32,
                 batch_size=4, dtype="fp32", set=["run.tensorboard=false"]) == 0
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "ltr") / "training_state" / "state.json").read_text())
    assert state["loader"]["fim_rate"] == 0.0  # a left-to-right tokenizer trains as before
    p = subprocess.run(polycoder_cmd("train", "--data", str(plain), "--out", str(tmp_path / "x"), "--preset",
                                     "test-tiny", "--fim-rate", "0.5", "--max-steps", "1"),
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "finetune --fim" in p.stderr and "Traceback" not in p.stderr
    helps = run_cli("train", "--help").stdout + run_cli("finetune", "--help").stdout
    assert helps.count("--fim-rate") >= 2 and helps.count("--fim-spm-rate") >= 2 and "--fim " in helps
    assert helps.count("--fim-line-rate") >= 2


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_fim(byte_fim, tmp_path):
    data = make_fim_token_dir(tmp_path / "tokens", byte_fim, n_docs=400)
    common = ["--data", str(data), "--preset", "test-tiny", "--max-steps", "6", "--seq-len", "48", "--batch-size", "8",
              "--micro-batch", "4", "--lr", "3e-3", "--dtype", "fp32", "--threads", "1", "--fim-rate", "0.7",
              "--set", "run.tensorboard=false"]
    one, two = one_and_two_processes(tmp_path, common)
    assert sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=0, atol=1e-5)


# ---- LoRA with the new rows ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fim_lora_run(full_base, jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fimlora")
    assert finetune(model=str(full_base), data=str(jsonl), out=str(out), fim=True, lora=True, merge=True, lora_r=4,
                    max_steps=8, lr=1e-2, batch_size=4, seq_len=64, dtype="fp32", set=["run.tensorboard=false"]) == 0
    return out


def test_lora_fim_trains_and_saves_the_new_rows(fim_lora_run, full_base, code_tokenizer):
    n = code_tokenizer.vocab_size
    cfg = json.loads((fim_lora_run / "final" / "adapter_config.json").read_text())
    # transformers 5's names for the two embeddings, so that peft finds them in GPTNeoXForCausalLM
    assert cfg["trainable_token_indices"] == {"embed_in": list(range(n, n + 4)), "lm_head": list(range(n, n + 4))}
    assert Path(cfg["base_model_name_or_path"]) == full_base.resolve()  # the original base, not a grown copy
    from safetensors.torch import load_file

    saved = load_file(fim_lora_run / "final" / "adapter_model.safetensors")
    rows = {k: v for k, v in saved.items() if "trainable_tokens" in k}
    assert len(rows) == 2 and all(v.shape == (4, 64) for v in rows.values())  # 4 rows each, not whole matrices
    base, _ = load_model(full_base)
    mean = base.gpt_neox.embed_in.weight.mean(0)
    assert sorted(k.split(".trainable_tokens")[0] for k in rows) == [
        "base_model.model.gpt_neox.embed_in.token_adapter", "base_model.model.lm_head.token_adapter"]
    row_in = next(v for k, v in rows.items() if "embed_in" in k)
    row_out = next(v for k, v in rows.items() if "lm_head" in k)
    assert (row_in - mean).abs().max() > 1e-3  # trained away from their mean start
    assert (row_out - base.embed_out.weight.mean(0)).abs().max() > 1e-3
    assert not any("embed_in.weight" in k or "embed_out.weight" in k for k in saved)


def test_lora_fim_adapter_opens_in_our_verbs_peft_and_merged_alike(fim_lora_run, full_base, code_tokenizer):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours, tok = load_model(fim_lora_run / "final")  # the adapter folder as a model: base grown, adapter merged
    merged, _ = load_model(fim_lora_run / "merged")
    assert tok.fim is not None and ours.config.vocab_size == merged.config.vocab_size == code_tokenizer.vocab_size + 64
    x = torch.tensor([arrange(tok.fim, tok.encode("def f(x):\n"), [], tok.encode("\n"), "spm")])
    with torch.no_grad():
        want = ours(x)
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(fim_lora_run / "final").eval()
        got = theirs(x).logits
    n = tok.vocab_size  # peft grows the base to the tokenizer's length, without our padding
    torch.testing.assert_close(got[..., :n], want[..., :n], rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(fim_lora_run / "final")
    assert hf_tok.convert_tokens_to_ids("<fim_middle>") == tok.fim.middle


def test_finetune_fim_result_exports_to_gguf_with_its_fim_ids(fim_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    from polycoder.export.gguf import write_gguf

    model, tok = load_model(fim_run / "final")
    path = write_gguf(model, tok, tmp_path / "fim.gguf", "f16", progress=False)
    fields = gguf.GGUFReader(str(path)).fields
    got = {k: int(fields[f"tokenizer.ggml.{k}_token_id"].parts[-1][0]) for k in ("fim_pre", "fim_suf", "fim_mid", "fim_pad")}
    assert got == {"fim_pre": tok.fim.prefix, "fim_suf": tok.fim.suffix, "fim_mid": tok.fim.middle, "fim_pad": tok.fim.pad}
    assert len(fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size  # the padded rows too
