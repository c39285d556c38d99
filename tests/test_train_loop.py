"""Pretraining: settings, the deterministic loader, the loop, checkpoints, resume, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_helpers import cli_env, losses, make_token_dir, one_and_two_processes, polycoder_cmd, run_cli

from polycoder.backend import choose, onednn
from polycoder.backend.fused_loss import linear_cross_entropy
from polycoder.checkpoint import build_model, load_model, load_weights, save_checkpoint
from polycoder.config import ModelConfig
from polycoder.errors import PolycoderError
from polycoder.tokenizer import Tokenizer
from polycoder.train import checkpointing as ckpt
from polycoder.train.distributed import Dist
from polycoder.train.loader import WindowLoader
from polycoder.train.loop import CosineSchedule, Trainer
from polycoder.train.loss import lm_loss
from polycoder.train.settings import load_settings


def tiny_model(vocab: int = 384, seed: int = 0):
    cfg = ModelConfig.from_preset("test-tiny").replace(vocab_size=vocab)
    return build_model(cfg, seed=seed).requires_grad_(True)


def corpus(n: int = 20_000, vocab: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    patterns = [rng.integers(3, vocab, size=int(rng.integers(8, 24))) for _ in range(6)]
    out = np.concatenate([patterns[i] for i in rng.integers(0, 6, size=n // 8)])
    return out[:n].astype(np.uint16)


def settings(**kw):
    base = {"run.max_steps": 20, "data.seq_len": 32, "data.batch_size": 8, "optim.lr": 3e-3,
            "run.precision": "fp32", "run.eval_every": 0, "run.save_every": 0, "run.tensorboard": False}
    base.update(kw)
    return load_settings(None, None, base)


def write(m, folder):
    save_checkpoint(m, Tokenizer.byte_level(), folder)


# ---- settings --------------------------------------------------------------------------


def test_settings_precedence_and_validation(tmp_path):
    s = load_settings("polycoder-160m")
    assert (s.optim.lr, s.data.batch_size, s.data.seq_len, s.run.max_steps) == (1.6e-4, 128, 2048, 150_000)
    assert s.optim.weight_decay == 0.0 and s.optim.grad_clip == 1.0 and s.optim.warmup == 0.01
    y = tmp_path / "s.yaml"
    y.write_text("optim:\n  lr: 3.0e-4\nrun:\n  max_steps: 10\n")
    s = load_settings("polycoder-160m", y, ["optim.lr=1e-3", "data.sampling=sequential"])
    assert (s.optim.lr, s.run.max_steps, s.data.sampling, s.data.batch_size) == (1e-3, 10, "sequential", 128)
    with pytest.raises(PolycoderError, match="optim.lrr"):
        load_settings(None, None, ["optim.lrr=1"])
    with pytest.raises(PolycoderError, match="sampling"):
        load_settings(None, None, ["data.sampling=shuffled"])
    with pytest.raises(PolycoderError, match="multiple"):
        load_settings(None, None, ["data.batch_size=6", "data.micro_batch=4"]).data.grad_accum(1)


def test_cosine_schedule():
    s = CosineSchedule(1.0, 100, 0.1, 0.1)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0) and s.lr(100) == pytest.approx(0.1)
    assert s.lr(55) == pytest.approx(0.55)


# ---- loader ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_loader_is_a_function_of_step_and_splits_across_ranks(sampling):
    arrays = [corpus(1000, seed=1), corpus(777, seed=2)]
    a = WindowLoader(arrays, 16, 8, sampling, seed=3)
    b = WindowLoader(arrays, 16, 8, sampling, seed=3)
    x5, y5 = a.global_batch(5)
    b.global_batch(0)
    assert torch.equal(b.global_batch(5)[0], x5)  # no hidden state: step 5 is step 5
    assert torch.equal(x5[:, 1:], y5[:, :-1])  # targets are inputs shifted by one
    assert not torch.equal(a.global_batch(6)[0], x5)
    # 2 ranks x 2 accumulation steps of 2 rows = the global batch of 8, row for row.
    parts = [a.micro_batch(5, r, 2, 2, m)[0] for m in range(2) for r in range(2)]
    assert torch.equal(torch.cat(parts), x5)


def test_sequential_sees_every_window_once_an_epoch():
    arrays = [np.arange(161, dtype=np.uint16), np.arange(1000, 1081, dtype=np.uint16)]
    L = WindowLoader(arrays, 16, 5, "sequential", seed=0)
    assert L.n_units == 10 + 5
    firsts = torch.cat([L.global_batch(s)[0][:, 0] for s in range(3)]).tolist()  # 15 windows = 1 epoch
    assert sorted(firsts) == sorted(list(range(0, 160, 16)) + list(range(1000, 1080, 16)))


def test_loader_rejects_too_little_data():
    with pytest.raises(PolycoderError, match="too few"):
        WindowLoader([np.zeros(10, np.uint16)], 16, 2)


# ---- the loop --------------------------------------------------------------------------


def test_lm_loss_matches_manual_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    y[0, 1] = -100
    lp = torch.log_softmax(logits.double(), -1)
    keep = y != -100
    want = -lp[keep].gather(-1, y[keep][:, None]).mean()
    assert lm_loss(logits, y).item() == pytest.approx(want.item(), abs=1e-6)


U32, U16 = 2.0 ** -24, 2.0 ** -9  # unit roundoff of fp32 and of bf16 (round to nearest)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("use_onednn", [False, True])
@pytest.mark.parametrize("native", [False, True])
def test_fused_linear_cross_entropy_equals_cross_entropy_on_full_logits(precision, chunk, use_onednn, native):
    """Loss and gradients of `linear_cross_entropy` against the same loss computed in fp64
    from the same inputs, with ignored rows and a loss scale (the backward's grad_output is
    not 1), on every route: oneDNN or MKL products, the native softmax pass or torch's.

    Tolerances follow from the arithmetic, not from one CPU's rounding. Each gradient is a
    sum of products (dL/dh = G W over the V logits, dL/dW = G^T h over the N rows), so its
    rounding error is at most n_terms * u * (|G| |W|) elementwise (the standard bound for
    a dot product in any summation order, u the unit roundoff), plus the error carried in
    from G itself, at most about as large again: fp32 allows 2 (n + 8) u32 (|G| |W|). In
    bf16 the inputs h, w and G are rounded to bf16 before the products (3 roundings of u16
    each) and the bf16 logits move the softmax by at most 2 u16 |z|max: allowed
    (3 + 2 |z|max) u16 (|G| |W|) + the fp32 sum bound. The loss: a sum of N fp32 log-sum-
    exps over V terms, relative error at most (V + N + 8) u32 in fp32. In bf16 the loss is
    held much tighter than the logits' rounding (|z| u16): it is compared with the fp64 loss
    of the exact logits rounded to bf16, and the fused path's logits (summed in fp32, then
    rounded to bf16) can differ from those only where the fp32 sum's error bound straddles
    a bf16 rounding boundary, by one bf16 step; the loss moves by at most the softmax-
    weighted sum of those steps (plus the target's), on top of the fp32 bound."""
    if use_onednn and not onednn.available():
        pytest.skip("torch here has no oneDNN linear op")
    g = torch.Generator().manual_seed(0)
    N, C, V = 150, 32, 1000
    h0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    bf16 = precision == "bf16"
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    with ac:
        loss = linear_cross_entropy(h, w, t, chunk=chunk, native=native, onednn=use_onednn)
    (loss * 0.25).backward()

    # fp64 reference from the inputs the products saw (rounded to bf16 under autocast)
    hx, wx = (h0.bfloat16().double(), w0.bfloat16().double()) if bf16 else (h0.double(), w0.double())
    hx.requires_grad_(True), wx.requires_grad_(True)
    z = hx @ wx.t()
    want = F.cross_entropy(z, t, ignore_index=-100)
    (want * 0.25).backward()
    keep = (t != -100).double()[:, None]
    G = (torch.softmax(z.detach(), -1) - F.one_hot(t.clamp(min=0), V)) * keep / keep.sum() * 0.25  # dL/dz
    zmax = z.detach().abs().max().item()
    if bf16:
        grad_bound = (3 + 2 * zmax) * U16 + 2 * (V + 8) * U32, (3 + 2 * zmax) * U16 + 2 * (N + 8) * U32
        z = z.detach()
        rounded = z.bfloat16().double()
        acc = (C + 1) * U32 * (hx.detach().abs() @ wx.detach().abs().t())  # the fp32 sum's error bound
        step = torch.maximum((rounded - (z - acc).bfloat16().double()).abs(),
                             (rounded - (z + acc).bfloat16().double()).abs())  # 0 where the rounding is sure
        want = F.cross_entropy(rounded, t, ignore_index=-100)
        rows = t != -100
        p = torch.softmax(rounded, -1)
        moved = (p * step).sum(-1) + step.gather(1, t.clamp(min=0)[:, None])[:, 0]
        loss_tol = moved[rows].mean().item() * torch.exp(step.max()).item() / abs(want.item()) + (V + N + 8) * U32
    else:
        grad_bound = 2 * (V + 8) * U32, 2 * (N + 8) * U32
        loss_tol = (V + N + 8) * U32
    assert abs(loss.item() - want.item()) <= loss_tol * abs(want.item())
    for got, exact, scale, name in ((h.grad, hx.grad, grad_bound[0] * (G.abs() @ wx.detach().abs()), "dh"),
                                    (w.grad, wx.grad, grad_bound[1] * (G.abs().t() @ hx.detach().abs()), "dW")):
        assert got.dtype == torch.float32
        err = (got.double() - exact).abs()
        assert (err <= scale + 1e-30).all(), f"{name}: worst error / bound {(err / (scale + 1e-30)).max().item():.2f}"
    with torch.no_grad(), ac:  # the evaluation path computes no gradients and the same loss
        assert linear_cross_entropy(h0, w0, t, chunk=chunk, native=native, onednn=use_onednn).item() == loss.item()


def test_onednn_linear_equals_f_linear_with_gradients():
    """The fp32 training linear through oneDNN against F.linear (MKL): output and the three
    gradients within 1e-5 relative to their largest value (fp32, other summation order:
    K <= 150 terms, K u32 < 1e-5). Called directly: by default the backend takes this
    route only on non-Intel CPUs."""
    if not onednn.available():
        pytest.skip("torch here has no oneDNN linear op; training uses F.linear")
    g = torch.Generator().manual_seed(2)
    x0, w0, b0 = torch.randn(3, 50, 96, generator=g), torch.randn(72, 96, generator=g), torch.randn(72, generator=g)
    gy = torch.randn(3, 50, 72, generator=g)
    outs = []
    for fn in (onednn.linear, torch.nn.functional.linear):
        x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        y = fn(x, w, b)
        assert (y.grad_fn.name() == "_LinearBackward") == (fn is onednn.linear)
        y.backward(gy)
        outs.append((y.detach(), x.grad, w.grad, b.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
    with torch.no_grad():  # outside training: the plain F.linear
        assert not onednn.applies(x0, w0)


def test_model_loss_from_targets_equals_loss_of_logits():
    """`model(x, targets=y)` (the fused head) equals lm_loss(model(x), y) with gradients, fp32."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 384, (2, 16), generator=g), torch.randint(0, 384, (2, 16), generator=g)
    y[1, :3] = -100
    a, b = tiny_model(), tiny_model()
    b.ops = choose("cpu").train_ops()  # what training runs on this machine
    la, lb = lm_loss(a(x), y), b(x, targets=y)
    la.backward()
    lb.backward()
    assert lb.item() == pytest.approx(la.item(), abs=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_tiny_model_loss_falls(tmp_path):
    data = corpus()
    t = Trainer(tiny_model(), settings(**{"run.max_steps": 40}), Dist(), [data], [corpus(3000, seed=0)],
                tmp_path, write, 32)
    r = t.fit()
    assert r.losses[0] > 5.5  # about ln(384) at initialisation
    assert r.losses[-1] < 0.5 * r.losses[0]
    assert r.val_loss is not None and r.val_loss < 0.6 * r.losses[0]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert records[-1]["val_ppl"] == pytest.approx(np.exp(records[-1]["val_loss"]))


def test_tiny_model_loss_falls_in_bf16(tmp_path):
    """bf16 autocast through the whole loop (on CPUs with the kernels: the native rotary
    pass and attention backward of polycoder.backend.attention)."""
    t = Trainer(tiny_model(), settings(**{"run.max_steps": 40, "run.precision": "bf16"}), Dist(), [corpus()], [],
                tmp_path, write, 32)
    r = t.fit()
    assert r.losses[0] > 5.5 and r.losses[-1] < 0.5 * r.losses[0]


def test_resume_in_process_equals_uninterrupted(tmp_path):
    """Same as the SIGTERM test below, without subprocesses: 20 steps vs 8 + resume 12."""
    data = [corpus()]
    full = Trainer(tiny_model(), settings(), Dist(), data, [], tmp_path / "a", write, 32).fit()
    s = settings(**{"run.save_every": 8})
    Trainer(tiny_model(), s, Dist(), data, [], tmp_path / "b", write, 32).fit()
    folder = ckpt.checkpoint_dir(tmp_path / "b", 8)
    model = tiny_model(seed=123)  # different weights: the checkpoint must overwrite them all
    load_weights(model, folder)
    resumed = Trainer(model, s, Dist(), data, [], tmp_path / "b", write, 32).fit(folder)
    assert len(resumed.losses) == 12
    np.testing.assert_allclose(resumed.losses, full.losses[8:], rtol=0, atol=1e-6)
    lb = losses(tmp_path / "b")
    assert sorted(lb) == list(range(1, 21))  # metrics.jsonl reads as one run


def test_keep_last_and_resume_refuses_other_data(tmp_path):
    data = [corpus()]
    s = settings(**{"run.save_every": 4, "run.keep_last": 2})
    Trainer(tiny_model(), s, Dist(), data, [], tmp_path, write, 32).fit()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [16, 20]
    t = Trainer(tiny_model(), s, Dist(), [corpus(15_000)], [], tmp_path, write, 32)
    with pytest.raises(PolycoderError, match="data or batch settings changed"):
        t.load_state(ckpt.latest_checkpoint(tmp_path))


def test_checkpoint_is_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    t = Trainer(tiny_model(), settings(**{"run.max_steps": 2}), Dist(), [corpus()], [], tmp_path, write, 32)
    r = t.fit()
    folder = Path(r.checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours, _ = load_model(folder)
    x = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)
    state = json.loads((folder / "training_state" / "state.json").read_text())
    assert state["step"] == 2 and state["loader"]["sampling"] == "random"


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path):
    t = Trainer(tiny_model(), settings(**{"run.max_steps": 3, "run.save_every": 1}), Dist(), [corpus()], [],
                tmp_path, write, 32)
    t.fit()
    good = ckpt.latest_checkpoint(tmp_path)
    before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}

    def dies_midway(m, folder):  # the model folder is written, then the process "dies"
        write(m, folder)
        raise KeyboardInterrupt("killed while saving")

    t.write_model = dies_midway
    t.step = 4
    with pytest.raises(KeyboardInterrupt):
        t.save()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert not ckpt.checkpoint_dir(tmp_path, 4).exists()
    t.write_model = write  # the next save clears the leftover and succeeds
    assert t.save() == ckpt.checkpoint_dir(tmp_path, 4)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigkill_during_saves_never_leaves_a_broken_latest(tmp_path):
    """A real process saving checkpoints in a loop, killed with SIGKILL at some moment."""
    script = f"""
import torch, sys
from polycoder.train import checkpointing as ckpt
from polycoder.checkpoint import build_model, save_checkpoint
from polycoder.tokenizer import Tokenizer
from polycoder.config import ModelConfig
m = build_model(ModelConfig.from_preset("test-tiny"), seed=0)
for step in range(1, 10_000):
    ckpt.save_training_checkpoint({str(tmp_path)!r}, step, lambda f: save_checkpoint(m, Tokenizer.byte_level(), f),
                                  {{"big": torch.zeros(2_000_000)}}, {{"step": step}}, keep_last=2)
    print(step, flush=True)
"""
    p = subprocess.Popen([*polycoder_cmd()[:1], "-c", script], env=cli_env(), stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        p.stdout.readline()
    time.sleep(0.137)
    p.kill()
    p.wait()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None
    model, _ = load_model(latest)  # complete and loadable
    state, optim, rng = ckpt.read_training_state(latest)
    assert optim["big"].numel() == 2_000_000 and rng is not None


# ---- the command line: real processes ----------------------------------------------------


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
    data = make_token_dir(tmp_path / "tokens", n_train=60_000)
    common = ["--data", str(data), "--preset", "test-tiny", "--max-steps", "150", "--seq-len", "64",
              "--batch-size", "16", "--micro-batch", "8", "--lr", "3e-3", "--precision", "fp32",
              "--threads", "1", "--eval-every", "0", "--save-every", "1000", "--set", "run.tensorboard=false"]
    run_cli("train", "--out", str(tmp_path / "ref"), *common)
    ref = losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, 151))

    out = tmp_path / "cut"
    p = subprocess.Popen(polycoder_cmd("train", "--out", str(out), *common), env=cli_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if len(losses(out)) >= 10:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]  # interrupted, not finished: resume it
    steps = [s for s, _ in ckpt.list_checkpoints(out)]
    assert len(steps) == 1 and 10 <= steps[0] < 150, (steps, err[-500:])

    run_cli("train", "--out", str(out), "--resume", *common)
    got = losses(out)
    assert sorted(got) == list(range(1, 151))
    np.testing.assert_allclose([got[s] for s in range(1, 151)], [ref[s] for s in range(1, 151)], rtol=0, atol=1e-6)


def test_train_verb_from_token_folder(tmp_path):
    data = make_token_dir(tmp_path / "tokens")
    from polycoder.train.pretrain import train

    out = tmp_path / "run"
    args = dict(data=str(data), out=str(out), preset="test-tiny", max_steps=6, seq_len=32, batch_size=4,
                dtype="fp32", eval_every=3, save_every=3, set=["run.tensorboard=false"])
    assert train(**args) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 6]
    model, _ = load_model(ckpt.latest_checkpoint(out))
    assert model.config.vocab_size == 384  # the shards' 300 tokens, padded to a multiple of 128
    with pytest.raises(PolycoderError, match="--resume"):
        train(**args)
    with pytest.raises(PolycoderError, match="--preset"):
        train(data=str(data), out=str(tmp_path / "x"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one(tmp_path, parallel):
    """torchrun, 2 CPU processes on gloo, micro batch 4 each = 1 process, 2 x 4 accumulated.

    Tolerance: 1e-5 on the loss of each of 12 steps (fp32; the sums of gradients are
    reduced in a different order, which moves the last digits only)."""
    data = make_token_dir(tmp_path / "tokens", n_train=40_000)
    common = ["--data", str(data), "--preset", "test-tiny", "--max-steps", "12", "--seq-len", "64",
              "--batch-size", "8", "--micro-batch", "4", "--lr", "3e-3", "--precision", "fp32", "--threads", "1",
              "--eval-every", "6", "--save-every", "6", "--parallel", parallel, "--set", "run.tensorboard=false"]
    one, two = one_and_two_processes(tmp_path, common)
    assert sorted(two) == list(range(1, 13))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=0, atol=1e-5)
    from polycoder.train.metrics import read_metrics

    val = lambda d: [r["val_loss"] for r in read_metrics(d / "metrics.jsonl") if "val_loss" in r]  # noqa: E731
    np.testing.assert_allclose(val(tmp_path / "two"), val(tmp_path / "one"), rtol=0, atol=1e-5)
    a, _ = load_model(ckpt.latest_checkpoint(tmp_path / "one"))
    b, _ = load_model(ckpt.latest_checkpoint(tmp_path / "two"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5, msg=name)


def test_model_section_changes_or_defines_the_architecture(tmp_path):
    from polycoder.train.pretrain import model_config

    y = tmp_path / "m.yaml"
    y.write_text("model:\n  n_layer: 3\n")
    s = load_settings("test-tiny", y)
    assert model_config("test-tiny", s.model).n_layer == 3
    cfg = model_config("my-model", {"n_layer": 2, "n_embd": 32, "n_head": 4, "intermediate_size": 64})
    assert (cfg.name, cfg.n_embd) == ("my-model", 32)
    with pytest.raises(PolycoderError, match="unknown preset"):
        model_config("my-model", {"n_layer": 2})
    with pytest.raises(PolycoderError, match="unknown model config field"):
        model_config("test-tiny", {"n_layers": 2})
