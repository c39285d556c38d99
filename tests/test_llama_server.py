"""llama.cpp's own server, `llama-server`, on our GGUF export of the bundled model: its `/infill`
(what llama.vscode and llama.vim call) fills the middle from the FIM token ids our export
writes, as our server's `/infill` does on the same weights.

llama-server comes from `make llama-cpp` (scripts/build_llama_server.sh puts it in the
virtual environment's bin/); these tests skip, saying so, where it has not been built.
Both servers run in fp32 on the bundled model's weights (bf16 values, exact in f32), one
sequence at a time, greedy; llama.cpp's prompt is PSM (`<fim_prefix>P<fim_suffix>S<fim_middle>`),
so ours is served in PSM too, with its suffix stop rule off (llama.cpp has none) and cursors
that end in code (whitespace at the cursor is healed by ours and not by llama.cpp).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
import torch

from polycoder.checkpoint import load_model
from polycoder.export.gguf import write_gguf
from polycoder.fim import arrange
from polycoder.locate import BUNDLED_DIR

fastapi = pytest.importorskip("fastapi")
from serve_server import LlamaServer, Server  # noqa: E402

LLAMA_SERVER = Path(os.environ.get("POLYCODER_LLAMA_SERVER", Path(sys.executable).parent / "llama-server"))
pytestmark = pytest.mark.skipif(not os.access(LLAMA_SERVER, os.X_OK),
                                reason=f"no llama-server at {LLAMA_SERVER}: run `make llama-cpp` once to build it")

# Two engines in fp32 may only part ways where our own top two logits are this close
# (matmuls summed in different orders differ by ~1e-5 relative over logits of size ~10).
NEAR_TIE = 1e-3

CURSORS = [
    ("def area(r):\n    return 3.14 *", "\n\n\nprint(area(2))\n"),
    ("public class Point {\n    private int x;\n    public int getX() {\n        return", ";\n    }\n}\n"),
    ("#include <stdio.h>\n\nint main(void) {\n\tprintf(", ");\n\treturn 0;\n}\n"),
    ("fn add(a: i32, b: i32) -> i32 {\n    a", "\n}\n"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama-server")
    model, tok = load_model(BUNDLED_DIR, dtype="float32", device="cpu")
    write_gguf(model, tok, tmp / "tiny-f32.gguf", "f32", progress=False)
    theirs = LlamaServer(LLAMA_SERVER, tmp / "tiny-f32.gguf", "-c", "512", "-b", "512", "-np", "1", "-t", "2",
                         log=tmp / "llama-server.log")
    try:
        ours = Server(BUNDLED_DIR, "--dtype", "float32", "--fim-order", "psm", "--no-stop-at-suffix")
    except Exception:
        theirs.stop()
        raise
    yield model, tok, theirs, ours
    theirs.stop()
    ours.stop()


def _infill(url: str, prefix: str, suffix: str, n_predict: int) -> dict:
    r = httpx.post(url + "/infill", json={"input_prefix": prefix, "input_suffix": suffix, "n_predict": n_predict,
                                          "temperature": 0, "cache_prompt": True}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_llama_server_infills_our_export_as_our_server_does(servers):
    model, tok, theirs, ours = servers
    for prefix, suffix in CURSORS:
        a, b = _infill(theirs.url, prefix, suffix, 64), _infill(ours.url, prefix, suffix, 64)
        # llama.cpp laid the cursor out as we do: prefix id, prefix, suffix id, suffix, middle id
        prompt = arrange(tok.fim, tok.encode(prefix), [], tok.encode(suffix), "psm")
        assert a["tokens_evaluated"] == b["tokens_evaluated"] == len(prompt)
        if a["content"] == b["content"]:
            continue
        # Parted ways: only where our own logits hold a near tie
        mine, ids = tok.encode(b["content"]), list(prompt)
        theirs_ids = tok.encode(a["content"])
        d = next((i for i, (x, y) in enumerate(zip(mine, theirs_ids)) if x != y), min(len(mine), len(theirs_ids)))
        with torch.no_grad():
            top2 = model(torch.tensor([ids + mine[:d]]))[0, -1].topk(2).values
        assert float(top2[0] - top2[1]) < NEAR_TIE, (prefix, a["content"], b["content"])


def test_llama_server_ends_the_middle_where_we_do(servers):
    """A middle the model ends (its end-of-document or a FIM sentinel, both end-of-generation
    tokens to llama.cpp through the ids our export writes) ends both servers' answers alike:
    "eos", not the n_predict limit."""
    _, _, theirs, ours = servers
    ended = 0
    for prefix, suffix in CURSORS:
        a, b = _infill(theirs.url, prefix, suffix, 64), _infill(ours.url, prefix, suffix, 64)
        if a["content"] == b["content"]:
            assert a["stop_type"] == b["stop_type"], (prefix, a["content"])
            ended += a["stop_type"] == "eos"
    assert ended >= 1  # the bundled model ends at least one of these middles itself
