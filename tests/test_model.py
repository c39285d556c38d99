"""Our GPT-NeoX against transformers' GPTNeoXForCausalLM on tiny random configs (CPU, fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REFERENCE

from polycoder.checkpoint import build_model, load_model, save_checkpoint
from polycoder.config import PRESETS, ModelConfig
from polycoder.errors import PolycoderError

ARCHS = [
    pytest.param(dict(parallel_residual=False, rotary_pct=1.0), id="sequential-rotary1.0"),
    pytest.param(dict(parallel_residual=False, rotary_pct=0.25), id="sequential-rotary0.25"),
    pytest.param(dict(parallel_residual=True, rotary_pct=1.0), id="parallel-rotary1.0"),
    pytest.param(dict(parallel_residual=True, rotary_pct=0.25), id="parallel-rotary0.25"),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    config = ModelConfig.from_preset("test-tiny").replace(**arch)
    ours = build_model(config, seed=2)
    save_checkpoint(ours, None, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(hf).__name__ == "GPTNeoXForCausalLM"
    x = torch.randint(0, config.vocab_size, (3, 37))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4


def test_parameter_names_are_the_names_transformers_writes(tmp_path):
    from safetensors import safe_open
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = ModelConfig.from_preset("test-tiny")
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"}))
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        on_disk = sorted(f.keys())
    assert "embed_out.weight" in on_disk  # transformers 5 calls it lm_head in memory only
    assert sorted(build_model(config).state_dict()) == on_disk


def test_cached_decoding_equals_recomputation():
    model = build_model(ModelConfig.from_preset("test-tiny-parallel"), seed=4)
    x = torch.randint(0, 500, (2, 12))
    cache = model.new_cache(2, 40)
    with torch.no_grad():
        full = model(x)
        pos = torch.arange(7)[None].expand(2, 7)
        logits = [model(x[:, :7], pos=pos, cache=cache)]
        for t in range(7, 12):
            logits.append(model(x[:, t : t + 1], pos=torch.full((2, 1), t), cache=cache))
    assert (torch.cat(logits, dim=1) - full).abs().max().item() < 1e-5


def test_rows_at_different_positions_share_one_decode_step():
    model = build_model(ModelConfig.from_preset("test-tiny"), seed=5)
    a, b = torch.randint(0, 500, (1, 9)), torch.randint(0, 500, (1, 4))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(a[:, :8], pos=torch.arange(8)[None], cache=_rows(cache, 0))  # prefill row 0
        model(b[:, :3], pos=torch.arange(3)[None], cache=_rows(cache, 1))  # prefill row 1
        step = model(torch.cat([a[:, 8:], b[:, 3:]]), pos=torch.tensor([[8], [3]]), cache=cache)
        assert (step[0, -1] - model(a)[0, -1]).abs().max() < 1e-5
        assert (step[1, -1] - model(b)[0, -1]).abs().max() < 1e-5


def _rows(cache, i):
    from polycoder.generation import CacheRows

    return CacheRows(cache, i, i + 1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precisions_run_close_to_fp32(dtype, tiny_folder):
    ref, _ = load_model(tiny_folder)
    low, _ = load_model(tiny_folder, dtype=dtype)
    assert low.embed_out.weight.dtype == getattr(torch, dtype)
    x = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        a, b = ref(x), low(x).float()
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item() + 0.05


@pytest.mark.parametrize("name,file", [("polycoder-160m", "config_160M.json"), ("polycoder-0.4b", "config_0-4B.json"),
                                       ("polycoder-2.7b", "config_2-7B.json")])
def test_presets_equal_the_released_configs(name, file):
    path = REFERENCE / file
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared is absent)")
    released = ModelConfig.from_json_file(path)
    assert released.replace(name=name) == PRESETS[name]
    assert PRESETS[name].vocab_size == 50304 and PRESETS[name].head_size * PRESETS[name].n_head == PRESETS[name].n_embd


def test_config_reads_transformers5_form_and_writes_both():
    from transformers import GPTNeoXConfig

    hf5 = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, rotary_pct=0.5, rotary_emb_base=500, use_parallel_residual=False)
    d = json.loads(hf5.to_json_string())
    assert "rope_parameters" in d and "rotary_pct" not in d
    c = ModelConfig.from_hf_dict(d)
    assert (c.rotary_pct, c.rope_base, c.parallel_residual) == (0.5, 500.0, False)
    out = c.to_hf_dict()
    assert out["rotary_pct"] == 0.5 and out["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert ModelConfig.from_hf_dict(out) == c


@pytest.mark.parametrize("change,field", [
    ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_act": "swiglu"}, "hidden_act"),
    ({"num_attention_heads": 5}, "divisible"),
])
def test_unsupported_config_names_the_field(change, field):
    d = ModelConfig.from_preset("test-tiny").to_hf_dict()
    d.update(change)
    with pytest.raises(PolycoderError, match=field):
        ModelConfig.from_hf_dict(d)


def test_padded_vocab_and_parameter_count():
    from polycoder.config import pad_vocab

    assert pad_vocab(50257) == 50304
    small = ModelConfig.from_preset("test-tiny")
    assert small.num_parameters() == build_model(small).num_parameters()


def test_flops_per_token_counts_each_matrix_once():
    c = PRESETS["polycoder-160m"]
    C, F, V, L, T = c.n_embd, c.intermediate_size, c.vocab_size, c.n_layer, 512
    matrices = L * (3 * C * C + C * C + 2 * C * F) + V * C  # qkv, attention out, MLP, output head
    small = c.num_parameters(include_embedding=False) - matrices  # biases and LayerNorms
    assert c.flops_per_token(T) == 6 * (matrices + small) + 12 * L * C * T
