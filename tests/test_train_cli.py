"""`polycoder train` and `finetune` as a user runs them: Ctrl-C, resuming with other settings, final/, no validation data."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
from test_train_helpers import cli_env, losses, make_token_dir, polycoder_cmd, run_cli

from polycoder.checkpoint import build_model, load_model, save_checkpoint
from polycoder.config import ModelConfig
from polycoder.tokenizer import Tokenizer
from polycoder.train import checkpointing as ckpt
from polycoder.train.metrics import read_metrics
from polycoder.train.pretrain import train
from polycoder.train.schedule import CosineSchedule

COMMON = ["--preset", "test-tiny", "--seq-len", "32", "--batch-size", "4", "--lr", "1e-3", "--precision", "fp32",
          "--threads", "1", "--eval-every", "0", "--set", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("tokens"))


def rates(run_dir) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "lr" in r}


def assert_same_weights(a, b) -> None:
    ma, _ = load_model(a)
    mb, _ = load_model(b)
    for (name, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0, msg=name)


def interrupt(cmd: list[str], out, after_steps: int = 3) -> subprocess.CompletedProcess:
    """Run `cmd`, press Ctrl-C (SIGINT) once `after_steps` steps are logged, wait for it to end."""
    p = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and len(losses(out)) < after_steps:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def test_ctrl_c_saves_exits_130_and_resumes_to_a_final_folder(tokens, tmp_path):
    out = tmp_path / "run"
    p = interrupt(polycoder_cmd("train", "--data", str(tokens), "--out", str(out), "--max-steps", "100000",
                                "--save-every", "100000", *COMMON), out)
    err = p.stderr
    assert p.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err
    (step, _), = ckpt.list_checkpoints(out)
    assert 3 <= step < 100000 and not (out / "final").exists()  # final/ is for finished runs only

    r = run_cli("train", "--data", str(tokens), "--out", str(out), "--resume", "--max-steps", str(step + 2),
                "--save-every", "100000", *COMMON)
    assert "keeping the learning-rate schedule" in r.stderr  # 100000 steps, not step + 2: see the next test
    assert "no validation data" not in r.stderr + r.stdout  # make_token_dir's valid/ is there
    assert sorted(losses(out)) == list(range(1, step + 3))
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == sorted(
        p.name for p in ckpt.latest_checkpoint(out).iterdir() if p.name != ckpt.STATE_DIR)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert_same_weights(ckpt.latest_checkpoint(out), final)
    assert f"trained test-tiny: {final}" in r.stdout


def test_resume_with_more_steps_keeps_the_schedule_unless_reschedule(tokens, tmp_path):
    first = tmp_path / "first"
    # the run to resume, in this process (the verb's own function): only the resumes need a fresh process
    assert train(data=str(tokens), out=str(first), preset="test-tiny", max_steps=4, save_every=0, seq_len=32,
                 batch_size=4, lr=1e-3, dtype="fp32", eval_every=0, set=["run.tensorboard=false"]) == 0
    again = tmp_path / "again"
    shutil.copytree(first, again)
    floor = 1e-3 * 0.1  # optim.min_lr_ratio's default

    r = run_cli("train", "--data", str(tokens), "--out", str(first), "--resume", "--max-steps", "8", "--save-every", "0",
                *COMMON)
    assert "keeping the learning-rate schedule of the run being resumed: peak 0.001 over 4 steps" in r.stderr
    assert "steps 5-8 run at its floor rate 0.0001" in r.stderr and "--reschedule" in r.stderr
    lr = rates(first)
    assert [lr[s] for s in range(5, 9)] == pytest.approx([floor] * 4)
    state = json.loads((ckpt.latest_checkpoint(first) / ckpt.STATE_DIR / "state.json").read_text())
    assert state["step"] == 8

    r = run_cli("train", "--data", str(tokens), "--out", str(again), "--resume", "--max-steps", "8", "--save-every", "0",
                "--reschedule", *COMMON)
    assert "--reschedule: the learning-rate schedule is now peak 0.001 over 8 steps" in r.stderr
    stretched = CosineSchedule(1e-3, 8, 0.01, 0.1)
    lr = rates(again)
    assert [lr[s] for s in range(5, 9)] == pytest.approx([stretched.lr(s - 1) for s in range(5, 9)])
    assert lr[5] > 5 * floor  # the jump that --reschedule makes, and the default avoids


def test_train_says_when_there_is_no_validation_data(tokens, tmp_path):
    data = tmp_path / "tokens"
    shutil.copytree(tokens, data)
    shutil.rmtree(data / "valid")  # what an empty valid split tokenizes to
    r = run_cli("train", "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", *COMMON)
    assert f"note: no validation data: {data}/valid holds no token shards" in r.stderr
    assert "polycoder data split" in r.stderr and "--by-file-below" in r.stderr
    row = next(line for line in r.stdout.splitlines() if "validation loss / ppl" in line)
    assert "none: no validation data" in row
    assert "none: no validation data" in (tmp_path / "run" / "summary.md").read_text()


def test_ctrl_c_during_finetune_exits_130_and_resumes(tmp_path):
    base = tmp_path / "base"
    save_checkpoint(build_model(ModelConfig.from_preset("test-tiny").replace(vocab_size=384), seed=0),
                    Tokenizer.byte_level(), base)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 20}) + "\n" for i in range(40)))
    out = tmp_path / "ft"
    args = ["--model", str(base), "--data", str(texts), "--out", str(out), "--lora", "--seq-len", "32",
            "--batch-size", "4", "--precision", "fp32", "--threads", "1", "--set", "run.tensorboard=false"]
    p = interrupt(polycoder_cmd("finetune", *args, "--max-steps", "100000"), out)
    assert p.returncode == 130, p.stderr[-2000:]
    (step, _), = ckpt.list_checkpoints(out)
    assert step >= 3 and not (out / "final").exists()
    run_cli("finetune", *args, "--resume", "--max-steps", str(step + 1))
    assert sorted(losses(out)) == list(range(1, step + 2)) and (out / "final" / "adapter_config.json").is_file()
