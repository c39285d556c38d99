"""`polycoder convert neox`: synthetic GPT-NeoX pipeline checkpoints from tiny random models, both directions.

Independent checks: transformers' GPTNeoXForCausalLM opens the converted folder and gives
the same logits; the tensor names agree with a separate reading of the layout written
here from PolyCoder's own conversion rule (Code-LMs' Convert2HF: walk the layer files in
order, rename by substring).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from polycoder.checkpoint import build_model, load_model
from polycoder.config import ModelConfig
from polycoder.convert.neox import convert_neox, neox_yaml, write_neox_checkpoint
from polycoder.errors import PolycoderError
from polycoder.locate import BUNDLED_DIR
from polycoder.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer_files() -> tuple[Path, Path]:
    """A GPT-2 style vocab.json + merges.txt of our own (the bundled model's); the tests about
    PolyCoder's released files take `polycoder_tokenizer_files` instead."""
    return BUNDLED_DIR / "vocab.json", BUNDLED_DIR / "merges.txt"


def _random_model(preset: str, seed: int = 3):
    model = build_model(ModelConfig.from_preset(preset), seed=seed)
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _convert(tmp_path: Path, model, files, ranks: int = 1, step: str = "global_step150000") -> Path:
    ck = tmp_path / "checkpoints"
    write_neox_checkpoint(model, ck / step, ranks=ranks)
    (tmp_path / "config.yml").write_text(neox_yaml(model.config, ranks))
    out = tmp_path / "converted"
    convert_neox(ck, files[0], files[1], tmp_path / "config.yml", out)
    return out


def _ids(n: int = 21, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset,ranks",
                         [("test-tiny", 1), ("test-tiny", 2), ("test-tiny-parallel", 1), ("test-tiny-parallel", 4)])
def test_roundtrip_logits_exact(tmp_path, tokenizer_files, preset, ranks):
    model = _random_model(preset)
    out = _convert(tmp_path, model, tokenizer_files, ranks)
    back, _ = load_model(out)
    assert back.config.n_layer == model.config.n_layer and back.config.parallel_residual == model.config.parallel_residual
    assert back.config.rotary_pct == model.config.rotary_pct
    with torch.no_grad():
        assert torch.equal(model(_ids()), back(_ids()))


def test_layout_matches_polycoder_reference_reading(tmp_path, tokenizer_files):
    """File numbering and key names as PolyCoder's Convert2HF read them (layer files in sorted order)."""
    model = _random_model("test-tiny")
    step = write_neox_checkpoint(model, tmp_path / "global_step1")
    names = sorted(p.name for p in step.iterdir())
    n = model.config.n_layer
    assert names == [f"layer_{i:02d}-model_00-model_states.pt" for i in [0, *range(2, n + 2), n + 3, n + 4]]
    reference: dict[str, torch.Tensor] = {}
    layer_id = -1
    for name in names:
        first_of_file = True
        for key, value in torch.load(step / name, weights_only=True).items():
            if "word_embeddings" in key:
                reference[key.replace("word_embeddings", "gpt_neox.embed_in")] = value
            elif "_layernorm" in key or "attention" in key or "mlp" in key:
                if first_of_file:  # a new transformer layer begins with each file
                    layer_id, first_of_file = layer_id + 1, False
                reference[f"gpt_neox.layers.{layer_id}.{key}"] = value
            elif key.startswith("norm."):
                reference["gpt_neox.final_layer_norm." + key.split(".")[-1]] = value
            elif "final_linear" in key:
                reference["embed_out." + key.split(".")[-1]] = value
    reference = {k: v for k, v in reference.items() if not k.endswith("inv_freq")}
    ours = model.state_dict()
    assert set(reference) == set(ours)
    assert all(torch.equal(reference[k], ours[k]) for k in ours)


def test_converted_folder_opens_in_transformers(tmp_path, tokenizer_files):
    model = _random_model("test-tiny")
    out = _convert(tmp_path, model, tokenizer_files)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids()).logits, model(_ids()), rtol=1e-5, atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    code = "def f(x):\n        return x  # eight spaces\n\tpass\n"
    assert hf_tok(code)["input_ids"] == Tokenizer.from_files(*tokenizer_files).encode(code)


def test_polycoder_tokenizer_opens_in_transformers_with_training_time_ids(tmp_path, polycoder_tokenizer_files,
                                                                          polycoder_tokenizer):
    out = _convert(tmp_path, _random_model("test-tiny"), polycoder_tokenizer_files)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    code = "def f(x):\n        return x  # eight spaces\n\tpass\n"
    assert hf_tok(code)["input_ids"] == polycoder_tokenizer.encode(code)


def test_training_time_tokenizer_saved(tmp_path, polycoder_tokenizer_files, polycoder_tokenizer):
    out = _convert(tmp_path, _random_model("test-tiny"), polycoder_tokenizer_files)
    _, tok = load_model(out)
    indented = "    if x:\n        y = 1\n"
    assert tok.encode(indented) == polycoder_tokenizer.encode(indented)
    assert tok.encode("    ").count(tok.encode(" ")[0]) == 4  # the dropped `Ġ Ġ` merge: one token a space


def test_tied_embeddings_and_hf_config(tmp_path, tokenizer_files):
    cfg = ModelConfig.from_preset("test-tiny").replace(tie_word_embeddings=True)
    model = build_model(cfg, seed=5)
    step = write_neox_checkpoint(model, tmp_path / "global_step7")
    assert not any("final_linear" in str(torch.load(p, weights_only=True).keys()) for p in step.iterdir())
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    convert_neox(step, *tokenizer_files, tmp_path / "config.json", tmp_path / "out")
    back, _ = load_model(tmp_path / "out")
    assert back.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(model(_ids()), back(_ids()))


def test_fp16_kept(tmp_path, tokenizer_files):
    model = _random_model("test-tiny").half()
    out = _convert(tmp_path, model, tokenizer_files)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    back, _ = load_model(out, dtype="float16")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_clear_errors(tmp_path, tokenizer_files):
    model = _random_model("test-tiny")
    step = write_neox_checkpoint(model, tmp_path / "ck" / "global_step1")
    cfg = tmp_path / "config.yml"
    cfg.write_text(neox_yaml(model.config.replace(n_layer=3)))
    with pytest.raises(PolycoderError, match="layer_04.*missing"):
        convert_neox(step, *tokenizer_files, cfg, tmp_path / "out")
    cfg.write_text(neox_yaml(model.config).replace('"pos-emb": "rotary"', '"pos-emb": "learned"'))
    with pytest.raises(PolycoderError, match="pos-emb"):
        convert_neox(step, *tokenizer_files, cfg, tmp_path / "out")
    with pytest.raises(PolycoderError, match="no GPT-NeoX layer files"):
        convert_neox(tmp_path, *tokenizer_files, cfg, tmp_path / "out")
    (step / "layer_00-model_01-model_states.pt").write_bytes(b"")
    cfg.write_text(neox_yaml(model.config))
    with pytest.raises(PolycoderError, match="incomplete"):
        convert_neox(step, *tokenizer_files, cfg, tmp_path / "out")


@pytest.mark.slow
def test_cli(tmp_path, tokenizer_files):
    model = _random_model("test-tiny")
    write_neox_checkpoint(model, tmp_path / "ck" / "global_step3")
    (tmp_path / "c.yml").write_text(neox_yaml(model.config))
    vocab, merges = tokenizer_files
    cmd = [sys.executable, "-m", "polycoder", "convert", "neox", "--checkpoint-dir", str(tmp_path / "ck"),
           "--vocab-file", str(vocab), "--merges-file", str(merges), "--config", str(tmp_path / "c.yml"),
           "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and (tmp_path / "out" / "model.safetensors").is_file()
    r = subprocess.run(cmd[:-4] + ["--config", str(tmp_path / "missing.yml"), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "config file not found" in r.stderr
