"""Fine-tuning: full and LoRA; adapters interchangeable with peft on transformers; merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polycoder.checkpoint import build_model, load_model, save_checkpoint
from polycoder.config import ModelConfig
from polycoder.errors import PolycoderError
from polycoder.tokenizer import Tokenizer
from polycoder.train.finetune import finetune, load_adapter, read_texts
from polycoder.train.metrics import read_metrics

CODE = [
    "def add(a, b):\n    return a + b\n",
    "def mul(a, b):\n    return a * b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny"
    cfg = ModelConfig.from_preset("test-tiny").replace(vocab_size=384)
    save_checkpoint(build_model(cfg, seed=0), Tokenizer.byte_level(), folder)
    return folder


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": CODE[i % 4] * (1 + i % 3)}) + "\n" for i in range(60)))
    return path


@pytest.fixture(scope="module")
def lora_run(base, jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    finetune(model=str(base), data=str(jsonl), out=str(out), lora=True, merge=True, lora_r=4, max_steps=6,
             lr=1e-2, batch_size=4, seq_len=64, precision="fp32", set=["run.tensorboard=false"])
    return out


def test_read_texts_jsonl_and_code_folder(tmp_path, jsonl):
    assert len(read_texts(jsonl)) == 60
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "src" / "b.rs").write_text("fn main() {}\n")
    (tmp_path / "src" / "notes.txt").write_text("not code")
    assert read_texts(tmp_path / "src") == ["x = 1\n", "fn main() {}\n"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(PolycoderError, match="bad.jsonl:1"):
        read_texts(bad)


def test_lora_run_writes_peft_adapter(lora_run, base):
    cfg = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(base)
    assert sorted(cfg["target_modules"]) == sorted(["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    records = read_metrics(lora_run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert records[-1]["val_loss"] > 0  # every 20th text is held out


def _ours_with_adapter(base, adapter):
    net, _ = load_model(base)
    return load_adapter(net, adapter).eval()


def test_lora_adapter_applied_by_peft_to_transformers_gives_our_logits(lora_run, base):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    x = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    ours = _ours_with_adapter(base, lora_run / "final")
    with torch.no_grad():
        want = ours(x)
        hf = transformers.GPTNeoXForCausalLM.from_pretrained(base).eval()
        plain = hf(x).logits
        theirs = peft.PeftModel.from_pretrained(hf, lora_run / "final").eval()
        got = theirs(x).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_merged_equals_unmerged(lora_run, base):
    merged, _ = load_model(lora_run / "merged")
    unmerged = _ours_with_adapter(base, lora_run / "final")
    x = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), rtol=1e-5, atol=1e-5)


def test_merge_an_existing_adapter(lora_run, base, tmp_path):
    assert finetune(model=str(base), out=str(tmp_path), adapter=str(lora_run / "final"), merge=True) == 0
    a, _ = load_model(tmp_path / "merged")
    b, _ = load_model(lora_run / "merged")
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


def test_full_finetune_loss_falls(base, jsonl, tmp_path):
    finetune(model=str(base), data=str(jsonl), out=str(tmp_path), max_steps=12, lr=3e-3, batch_size=4,
             seq_len=64, precision="fp32", set=["run.tensorboard=false"])
    loss = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert loss[-1] < 0.7 * loss[0]
    model, tok = load_model(tmp_path / "final")
    assert model.config.vocab_size == 384 and tok.vocab_size == 259


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_qlora_without_gpu_is_a_clear_error(base, jsonl, tmp_path):
    with pytest.raises(PolycoderError, match="QLoRA needs a CUDA GPU"):
        finetune(model=str(base), data=str(jsonl), out=str(tmp_path), qlora=True, max_steps=1)
