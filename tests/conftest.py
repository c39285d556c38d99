"""Shared fixtures: tiny random models saved as Hugging Face folders, and tokenizers.

Every fixture here builds what it needs from the repository itself (the bundled model's
tokenizer, which ships in the package), so the suite runs in a plain clone. Only the
`polycoder_tokenizer*` fixtures read PolyCoder's released tokenizer files from
../shared/polycoder-reference, for the tests that are about those files; without them
those tests skip with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from polycoder.checkpoint import build_model, save_checkpoint
from polycoder.config import ModelConfig, pad_vocab
from polycoder.fim import FIM_TOKENS
from polycoder.locate import BUNDLED_DIR
from polycoder.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "polycoder-reference"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def polycoder_tokenizer_files() -> tuple[Path, Path]:
    vocab, merges = REFERENCE / "code-vocab.json", REFERENCE / "code-merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        pytest.skip(f"PolyCoder's reference tokenizer files are not at {REFERENCE} (../shared is absent)")
    return vocab, merges


@pytest.fixture(scope="session")
def polycoder_tokenizer(polycoder_tokenizer_files) -> Tokenizer:
    return Tokenizer.from_files(*polycoder_tokenizer_files)


@pytest.fixture(scope="session")
def code_tokenizer() -> Tokenizer:
    """The bundled model's tokenizer without its fill-in-the-middle sentinels: 8192 code
    tokens (all 256 bytes, whitespace runs), left to right. Tests of FIM add the sentinels
    back with `with_fim_tokens()` (the same ids as the bundled model's: they are the last four)."""
    spec = json.loads((BUNDLED_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in FIM_TOKENS]
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)))


@pytest.fixture(scope="session")
def tiny_config(code_tokenizer) -> ModelConfig:
    """test-tiny (PolyCoder's layout, tiny widths) for the code tokenizer, with a padded tail
    of embedding rows that no token uses, as PolyCoder has (50257 tokens, 50304 rows): the
    engine must never sample them."""
    return ModelConfig.from_preset("test-tiny").replace(vocab_size=pad_vocab(code_tokenizer.vocab_size + 1))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_config, code_tokenizer) -> Path:
    """A random test-tiny model with the code tokenizer, saved by us."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_checkpoint(build_model(tiny_config, seed=1), code_tokenizer, folder)
    return folder
