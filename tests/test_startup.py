"""A fast start: `--help` without torch, and a model loaded by writing each weight once.

Each command runs in a fresh interpreter (`sys.executable`, with this checkout's
PYTHONPATH), since what a start imports is only visible from an empty `sys.modules`.
benchmarks/startup.py measures the times; these tests hold the causes in place.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from polycoder.checkpoint import build_model, empty_model, load_model, save_checkpoint
from polycoder.cli import COMMANDS, _available
from polycoder.config import ModelConfig
from polycoder.model import GPTNeoX
from polycoder.tokenizer import Tokenizer

HELP = """
import sys
from polycoder.cli import main
try:
    main({argv!r})
except SystemExit as e:  # argparse's --help exits 0
    assert e.code in (0, None), e.code
loaded = [m for m in ("torch", "transformers", "huggingface_hub", "safetensors") if m in sys.modules]
print("LOADED", loaded)
"""


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("argv", [["--help"]] + [[*verb.split(), "--help"] for verb in COMMANDS],
                         ids=lambda argv: " ".join(argv))
def test_help_does_not_import_torch(argv):
    verb = " ".join(argv[:-1])
    if verb and not _available(COMMANDS[verb]):
        pytest.skip(f"{verb}: its extra is not installed here")
    out = _python(HELP.format(argv=argv))
    assert "usage: polycoder" in out
    assert out.splitlines()[-1] == "LOADED []", (
        f"`polycoder {' '.join(argv)}` imported {out.splitlines()[-1]}: a verb's module imports torch, and our "
        "modules that import it, inside the functions that run the model (see tests/test_structure.py)")


def test_the_generation_package_imports_its_names_when_asked():
    """`polycoder.generation` resolves its names on first use (so `generate --help` stays light)."""
    out = _python("import sys, polycoder.generation as g\n"
                  "print('torch' in sys.modules)\n"
                  "from polycoder.generation import SamplingParams, generate\n"
                  "print([n for n in g.__all__ if getattr(g, n, None) is None], SamplingParams.__module__)")
    assert out.split() == ["False", "[]", "polycoder.generation.sampling"]


def test_generate_does_not_import_dynamo_or_transformers(tiny_folder):
    """Building the model on the meta device imported torch._dynamo (2.5-3 s of each start):
    `normal_` and `arange` on meta tensors run Python decompositions that need it."""
    code = (f"import sys\nfrom polycoder.cli import main\n"
            f"main(['generate', '--model', {str(tiny_folder)!r}, '--prompt', 'def f(', '--max-new-tokens', '2'])\n"
            f"print('\\nLOADED', [m for m in ('torch._dynamo', 'transformers', 'sympy') if m in sys.modules])")
    assert _python(code).splitlines()[-1] == "LOADED []"


def test_a_loaded_model_holds_the_files_weights_and_computed_tables(tmp_path):
    config = ModelConfig.from_preset("test-tiny").replace(tie_word_embeddings=True)
    saved = build_model(config, seed=3)
    save_checkpoint(saved, Tokenizer.byte_level(), tmp_path / "m")
    for dtype, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        net, _ = load_model(tmp_path / "m", dtype=dtype)
        state = net.state_dict()
        for name, value in saved.state_dict().items():
            if name.endswith(("rotary_emb.cos", "rotary_emb.sin")):
                assert state[name].dtype == torch.float32 and torch.equal(state[name], value), name
            else:
                assert state[name].dtype == dt and torch.equal(state[name], value.to(dt)), name
        assert net.embed_out.weight is net.gpt_neox.embed_in.weight
        assert not any(p.requires_grad for p in net.parameters())


def test_build_model_is_pytorch_construction_then_init_weights():
    """Skipping PyTorch's own initialisation changes nothing: init_weights writes every parameter."""
    config = ModelConfig.from_preset("test-tiny")
    reference = GPTNeoX(config)
    reference.init_weights(7)
    ours = build_model(config, seed=7)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


def test_empty_model_allocates_parameters_in_the_asked_dtype_and_tables_in_float32():
    net = empty_model(ModelConfig.from_preset("test-tiny"), torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in net.buffers()} == {torch.float32}
