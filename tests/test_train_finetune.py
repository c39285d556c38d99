"""Fine-tuning: full and LoRA; adapters interchangeable with peft on transformers; merging."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_train_helpers import cli_env, polycoder_cmd

from polycoder.checkpoint import build_model, load_model, save_checkpoint
from polycoder.config import ModelConfig
from polycoder.errors import PolycoderError
from polycoder.lora import load_adapter
from polycoder.tokenizer import Tokenizer
from polycoder.train.finetune import finetune, read_texts
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
             lr=1e-2, batch_size=4, seq_len=64, dtype="fp32", set=["run.tensorboard=false"])
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
    assert Path(cfg["base_model_name_or_path"]) == base.resolve()  # absolute: it resolves from any directory
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
    # without --model: into the base the adapter records, not the bundled default
    assert finetune(out=str(tmp_path / "own"), adapter=str(lora_run / "final"), merge=True) == 0
    c, _ = load_model(tmp_path / "own" / "merged")
    for (k, va), (_, vc) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vc), k


def test_full_finetune_loss_falls(base, jsonl, tmp_path):
    finetune(model=str(base), data=str(jsonl), out=str(tmp_path), max_steps=12, lr=3e-3, batch_size=4,
             seq_len=64, dtype="fp32", set=["run.tensorboard=false"])
    loss = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert loss[-1] < 0.7 * loss[0]
    model, tok = load_model(tmp_path / "final")
    assert model.config.vocab_size == 384 and tok.vocab_size == 259


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_qlora_without_gpu_is_a_clear_error(base, jsonl, tmp_path):
    with pytest.raises(PolycoderError, match="QLoRA needs a CUDA GPU"):
        finetune(model=str(base), data=str(jsonl), out=str(tmp_path), qlora=True, max_steps=1)


# ---- the adapter folder as a model, from the command line -----------------------------------------


@pytest.fixture(scope="module")
def cli_lora(base, jsonl) -> Path:
    """`polycoder finetune --lora --merge` run by the CLI in the base's parent folder, with the
    base and the run named relative to it (as a user in that folder would)."""
    p = subprocess.run(polycoder_cmd("finetune", "--model", base.name, "--data", str(jsonl), "--out", "run", "--lora",
                                     "--merge", "--lora-r", "4", "--max-steps", "2", "--lr", "1e-2", "--batch-size", "4",
                                     "--seq-len", "64", "--precision", "fp32", "--set", "run.tensorboard=false"),
                       cwd=base.parent, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return base.parent / "run"


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(polycoder_cmd(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"polycoder {' '.join(args)}:\n{p.stderr[-3000:]}"
    return p


def test_cli_adapter_records_an_absolute_base(cli_lora, base):
    cfg = json.loads((cli_lora / "final" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).is_absolute()
    assert Path(cfg["base_model_name_or_path"]) == base.resolve()
    tuned, _ = load_model(cli_lora / "final")
    plain, _ = load_model(base)
    qkv = [m.gpt_neox.layers[0].attention.query_key_value.weight for m in (tuned, plain)]
    assert not torch.equal(*qkv)  # the adapter (merged on load) changes the weights it targets


def test_adapter_folder_is_a_model_in_generate_and_perplexity_from_another_cwd(cli_lora, tmp_path):
    """The adapter folder `finetune --lora` prints works as --model from elsewhere: merged on
    load (said on stderr), the same completions and scores as the folder `--merge` wrote."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    adapter, merged = cli_lora / "final", cli_lora / "merged"
    common = ("--prompt", "def add(", "--max-new-tokens", "12", "--temperature", "0", "--json-output")
    a = _cli(elsewhere, "generate", "--model", str(adapter), *common)
    m = _cli(elsewhere, "generate", "--model", str(merged), *common)
    assert "LoRA adapter" in a.stderr and "merged into the weights on load" in a.stderr
    assert json.loads(a.stdout)[0]["tokens"] == 12
    assert json.loads(a.stdout) == json.loads(m.stdout)

    (elsewhere / "code" / "Python").mkdir(parents=True)
    (elsewhere / "code" / "Python" / "f.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    _cli(elsewhere, "eval", "perplexity", "--data", "code", "--out", "ppl", "--model", str(adapter), str(merged))
    report = json.loads((elsewhere / "ppl" / "perplexity.json").read_text())  # one entry a model, by its argument
    assert report[str(adapter)]["Python"]["bits_per_byte"] > 0
    assert report[str(adapter)] == report[str(merged)]


def test_auto_peft_model_opens_the_adapter_from_another_cwd(cli_lora, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(cli_lora / "final")).eval()
    ours, _ = load_model(cli_lora / "final")
    x = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_old_adapter_with_a_relative_base_still_loads(cli_lora, base, tmp_path, monkeypatch):
    """Adapters written before bases were absolute hold a path relative to where finetune ran:
    it is looked for above the adapter folder too; a base that is nowhere is one clear error."""
    project = tmp_path / "project"
    shutil.copytree(base, project / "models" / "tiny")
    old = project / "runs" / "x" / "final"
    shutil.copytree(cli_lora / "final", old)
    cfg = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "models/tiny"}))
    monkeypatch.chdir(tmp_path)  # not the project folder: "models/tiny" does not resolve from here
    got, _ = load_model(old)
    want, _ = load_model(cli_lora / "merged")
    for (k, va), (_, vb) in zip(got.state_dict().items(), want.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-6, msg=k)
    (old / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "models/gone"}))
    with pytest.raises(PolycoderError, match="base model of adapter .*models/gone"):
        load_model(old)
    (old / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "moved")}))
    with pytest.raises(PolycoderError, match="not there any more.*base_model_name_or_path"):
        load_model(old)


def test_export_gguf_of_the_adapter_folder_writes_the_merged_model(cli_lora, tmp_path):
    pytest.importorskip("gguf")
    from polycoder.export.gguf import export_gguf
    from polycoder.options import ModelOptions

    export_gguf(tmp_path / "adapter.gguf", model_options=ModelOptions(model=str(cli_lora / "final")), outtype="f32",
                check=False)
    export_gguf(tmp_path / "merged.gguf", model_options=ModelOptions(model=str(cli_lora / "merged")), outtype="f32",
                check=False)
    assert (tmp_path / "adapter.gguf").read_bytes() == (tmp_path / "merged.gguf").read_bytes()


def test_adapter_folder_in_bfloat16_is_the_merged_model_rounded_once(lora_run):
    """Merged in float32 and then cast: the same weights as the merged folder loaded in bf16."""
    got, _ = load_model(lora_run / "final", dtype="bfloat16")
    want, _ = load_model(lora_run / "merged", dtype="bfloat16")
    for (k, va), (_, vb) in zip(got.state_dict().items(), want.state_dict().items()):
        assert va.dtype == vb.dtype and torch.equal(va, vb), k
    assert got.gpt_neox.rotary_emb.cos.dtype == torch.float32
