"""Loading folders written by transformers, and writing folders transformers opens."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import polycoder.checkpoint
from polycoder.checkpoint import load_model, save_checkpoint
from polycoder.errors import PolycoderError


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_folder_saved_by_transformers_loads_and_matches(tiny_folder, tmp_path, shard):
    hf = _hf_model(tiny_folder)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "hf", **kwargs)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours, _ = load_model(tmp_path / "hf", tokenizer=tiny_folder)  # transformers saved no tokenizer
    x = torch.randint(0, 8192, (2, 30))
    assert (_logits(ours, x) - _logits(hf, x)).abs().max() < 1e-4


def test_pytorch_model_bin_and_legacy_buffers(tiny_folder, tmp_path):
    """transformers 4.x folders: pytorch_model.bin with attention.bias / masked_bias / inv_freq buffers."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    state = load_file(str(tiny_folder / "model.safetensors"))
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 256, 256, dtype=torch.bool).tril()
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}  # released weights are fp16
    torch.save(state, folder / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / f).write_bytes((tiny_folder / f).read_bytes())
    ours, _ = load_model(folder)
    ref, _ = load_model(tiny_folder)
    assert ours.embed_out.weight.dtype == torch.float32
    x = torch.randint(0, 8192, (1, 16))
    assert (_logits(ours, x) - _logits(ref, x)).abs().max() < 1e-2  # fp16 rounding of the weights


def test_folder_we_save_opens_in_transformers_with_tokenizer(tiny_folder):
    from transformers import AutoTokenizer

    hf = _hf_model(tiny_folder)
    ours, tok = load_model(tiny_folder)
    x = torch.randint(0, 8192, (2, 25))
    assert (_logits(ours, x) - _logits(hf, x)).abs().max() < 1e-4
    text = "def f(x):\n\treturn x  # ok\n"
    assert AutoTokenizer.from_pretrained(tiny_folder)(text)["input_ids"] == tok.encode(text)


def test_saved_dtype_and_sharding(tiny_folder, tmp_path):
    model, tok = load_model(tiny_folder)
    out = save_checkpoint(model, tok, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=2_000_000)
    assert (out / "model.safetensors.index.json").is_file()
    again, _ = load_model(out, dtype="bfloat16")
    assert torch.equal(again.embed_out.weight, model.embed_out.weight.bfloat16())
    assert _hf_model(out) is not None


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tiny_folder, tmp_path, monkeypatch):
    model, tok = load_model(tiny_folder)
    target = save_checkpoint(model, tok, tmp_path / "ckpt")
    before = (target / "model.safetensors").read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(polycoder.checkpoint, "save_file", disk_full)  # safetensors' writer, as imported there
    with torch.no_grad():
        model.embed_out.weight.add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(model, tok, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left behind


def test_loader_errors_name_the_problem(tiny_folder, tmp_path):
    with pytest.raises(PolycoderError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        load_model(tmp_path / "empty")
    with pytest.raises(PolycoderError, match="preset"):
        load_model("polycoder-160m")
    with pytest.raises(PolycoderError, match="not found"):
        load_model(str(tmp_path / "nowhere" / "x" / "y"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    state = load_file(str(tiny_folder / "model.safetensors"))
    state.pop("gpt_neox.final_layer_norm.weight")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(PolycoderError, match="missing for gpt_neox.final_layer_norm.weight"):
        load_model(bad, tokenizer=tiny_folder)
    state["gpt_neox.final_layer_norm.weight"] = torch.ones(3)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(PolycoderError, match="shape"):
        load_model(bad, tokenizer=tiny_folder)


def test_hub_id_offline_fails_with_a_clear_message(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "polycoder", "generate", "--model", "NinedayWang/PolyCoder-160M",
                        "--prompt", "x"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "NinedayWang/PolyCoder-160M" in r.stderr and "--model DIR" in r.stderr
    assert "Traceback" not in r.stderr


def test_random_init_preset_runs():
    model, tok = load_model("test-tiny", random_init=True)
    assert model.config.name == "test-tiny" and tok.vocab_size <= model.config.vocab_size


def test_saved_folder_is_readable_by_others(tiny_folder, tmp_path):
    import stat

    model, tok = load_model(tiny_folder)
    out = save_checkpoint(model, tok, tmp_path / "shared")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
