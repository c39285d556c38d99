"""What a model argument means: the bundled model by name, a run folder, and errors before any work."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from test_train_helpers import cli_env, make_token_dir, polycoder_cmd

from polycoder.checkpoint import load_model
from polycoder.errors import PolycoderError
from polycoder.locate import BUNDLED_DIR, BUNDLED_NAME, resolve, resolve_all


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    p = subprocess.run(polycoder_cmd(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"polycoder {' '.join(args)}:\n{p.stderr[-3000:]}"
    return p


def test_the_bundled_model_by_name_in_process():
    assert resolve(BUNDLED_NAME) == resolve(None) == BUNDLED_DIR
    named, _ = load_model(BUNDLED_NAME)
    default, _ = load_model()
    assert all((a == b).all() for a, b in zip(named.state_dict().values(), default.state_dict().values()))
    preset, _ = load_model(BUNDLED_NAME, random_init=True)  # with --random-init the name is the architecture
    assert preset.config.name == BUNDLED_NAME
    assert not (preset.embed_out.weight == default.embed_out.weight).all()


def test_the_bundled_model_by_name_on_the_command_line(tmp_path):
    common = ("--prompt", "int main(", "--max-new-tokens", "6", "--temperature", "0", "--json-output")
    named = _cli("generate", "--model", BUNDLED_NAME, *common, cwd=tmp_path)
    default = _cli("generate", *common, cwd=tmp_path)
    assert json.loads(named.stdout) == json.loads(default.stdout)
    assert json.loads(named.stdout)[0]["tokens"] == 6


def test_every_model_argument_is_checked_before_any_is_loaded(tmp_path):
    with pytest.raises(PolycoderError, match="'polycoder-160m' is a preset.*--random-init"):
        resolve_all([BUNDLED_NAME, "polycoder-160m"])
    with pytest.raises(PolycoderError, match="not found.*polycoder-tiny"):
        resolve_all([None, str(tmp_path / "nowhere" / "x" / "y")])
    assert resolve_all([None, "polycoder-160m"], random_init=True) == [BUNDLED_DIR, "polycoder-160m"]


def test_finetune_defaults_to_the_bundled_model(tmp_path):
    from polycoder.train.finetune import finetune

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(8)))
    finetune(out=str(tmp_path / "run"), data=str(data), lora=True, max_steps=1, batch_size=2, seq_len=32,
             dtype="fp32", set=["run.tensorboard=false"])
    cfg = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(BUNDLED_DIR.resolve())
    model, _ = load_model(tmp_path / "run")  # the run folder: its final/, an adapter merged into the bundled model
    assert model.config.n_layer == 6 and model.config.vocab_size == 8256


def test_a_run_folder_is_its_newest_complete_checkpoint_or_final(tmp_path, capsys):
    """A real 2-step `train`: --model RUN means the newest complete checkpoint, said on stderr;
    a half-written one (no training_state/state.json) is passed over; final/ wins when there."""
    data = make_token_dir(tmp_path / "tokens", n_train=4_000, n_valid=500)
    _cli("train", "--preset", "test-tiny", "--data", str(data), "--out", "runs/x", "--max-steps", "2",
         "--save-every", "1", "--seq-len", "32", "--batch-size", "2", "--precision", "fp32",
         "--set", "run.tensorboard=false", cwd=tmp_path)
    run = tmp_path / "runs" / "x"
    shutil.rmtree(run / "final", ignore_errors=True)  # where train writes final/, the step rule is checked first
    partial = run / "checkpoints" / "step_00000003"
    shutil.copytree(run / "checkpoints" / "step_00000002", partial)
    (partial / "training_state" / "state.json").unlink()

    g = _cli("generate", "--model", "runs/x", "--prompt", "ab", "--max-new-tokens", "2", cwd=tmp_path)
    assert "runs/x is a run folder: using runs/x/checkpoints/step_00000002" in g.stderr

    shutil.copytree(run / "checkpoints" / "step_00000001", run / "final")
    assert resolve(run) == run / "final"
    assert f"{run} is a run folder: using {run / 'final'}" in capsys.readouterr().err

    empty = tmp_path / "runs" / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(PolycoderError, match="without a complete checkpoint"):
        resolve(empty)
