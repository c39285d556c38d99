"""The native kernels' header (kernels.h) against the ctypes table (kernels.SIGNATURES).

The header declares every function the library exports; the table is what Python tells
ctypes about them. A mismatch (an argument added in C but not in Python, a long passed as
an int) would corrupt the call silently, so the two are compared here: parsed from the
header's text, without building anything. Where the kernels build on this machine, the
built library must export every declared function too.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess

import pytest

from polycoder import kernels

# C scalar types -> ctypes; any pointer is c_void_p.
C_TYPES = {"int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float}
PROTOTYPE = re.compile(r"(?P<ret>\w+)\s+(?P<name>\w+)\s*\((?P<params>[^()]*)\)")


def _ctype(param: str, where: str):
    """The ctypes type of one parameter ("const float *cos_t", "long n") or return type."""
    if "*" in param:
        return ctypes.c_void_p
    words = [w for w in param.split() if w != "const"]
    assert 1 <= len(words) <= 2, f"{where}: cannot read the parameter {param!r}"
    assert words[0] in C_TYPES, f"{where}: C type {words[0]!r} has no ctypes mapping here (add one)"
    return C_TYPES[words[0]]


def parse_header(text: str) -> dict:
    """name -> (restype, [argtypes]) of every prototype in a C header's text."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"^\s*#[^\n]*", " ", text, flags=re.M)  # include guards, includes
    decls = {}
    for statement in text.split(";"):
        statement = " ".join(statement.split())
        if not statement:
            continue
        m = PROTOTYPE.fullmatch(statement)
        assert m, f"not a simple prototype: {statement!r}"
        name, params = m["name"], m["params"].strip()
        assert name not in decls, f"{name} declared twice"
        args = [] if params in ("", "void") else [_ctype(p, name) for p in params.split(",")]
        decls[name] = (_ctype(m["ret"], name), args)
    return decls


def test_parser_reads_a_small_header():
    text = """/* a comment; with a semicolon */
    #ifndef X
    #include <stdint.h>
    int f(void);
    // another
    int g(const void *const *a, long n,
          float s, uint16_t *p, const int64_t *t, int k);
    #endif
    """
    assert parse_header(text) == {
        "f": (ctypes.c_int, []),
        "g": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int]),
    }
    with pytest.raises(AssertionError, match="no ctypes mapping"):
        parse_header("int h(double x);")


def test_header_and_ctypes_table_agree():
    header = parse_header(kernels.HEADER.read_text())
    assert sorted(header) == sorted(kernels.SIGNATURES), "kernels.h and kernels.SIGNATURES name different functions"
    assert list(header) == list(kernels.SIGNATURES), "SIGNATURES is not in kernels.h's order"
    for name, (restype, argtypes) in header.items():
        want_res, want_args = kernels.SIGNATURES[name]
        assert want_res is restype, f"{name}: returns {restype.__name__} in kernels.h, {want_res.__name__} in SIGNATURES"
        assert len(want_args) == len(argtypes), f"{name}: {len(argtypes)} arguments in kernels.h, {len(want_args)} in SIGNATURES"
        for i, (c, py) in enumerate(zip(argtypes, want_args)):
            assert c is py, f"{name} argument {i}: {c.__name__} in kernels.h, {py.__name__} in SIGNATURES"


def test_every_source_includes_the_header():
    for source in kernels.SOURCES:
        text = source.read_text()
        assert '#include "kernels.h"' in text and '#include "common.h"' in text, source.name


def test_built_library_exports_every_declared_function():
    if not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    dll = ctypes.CDLL(str(kernels._build()))  # the cached library _load uses
    missing = [name for name in parse_header(kernels.HEADER.read_text()) if not hasattr(dll, name)]
    assert not missing, f"declared in kernels.h but not exported: {missing}"


@pytest.mark.parametrize("march,code,runs", [("x86-64", 0, True), ("x86-64-v3", 2, True), ("alderlake", 2, False)])
def test_sources_compile_for_each_x86_level(tmp_path, march, code, runs):
    """Each x86-64 level builds against the header: the baseline (no AVX2) into the stubs,
    x86-64-v3 into the AVX2 + FMA variant (which each says where this CPU runs it), and an
    AVX2 CPU with AVX-VNNI (Alder Lake: its int8 products take vpdpwssd; compiled only, as
    the CPUs at hand lack AVX-VNNI)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler for x86-64")
    out = tmp_path / f"{march}.so"
    command = [cc, "-O1", f"-march={march}", "-fopenmp", "-shared", "-fPIC", *map(str, kernels.SOURCES), "-o", str(out), "-lm"]
    r = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if r.returncode and march in r.stderr:
        pytest.skip(f"this compiler does not know -march={march}: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    if not runs or (code and not set(kernels.ISAS["avx2"][1]) <= set(kernels._cpu_flags().split())):
        return  # built and checked by the compiler; this CPU cannot run it
    dll = ctypes.CDLL(str(out))
    for name, (restype, argtypes) in kernels.SIGNATURES.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = restype, argtypes
    assert dll.pc_available() == code and kernels.VARIANTS.get(code) == {2: "AVX2+FMA"}.get(code)
    empty_attention_grad = dll.pc_attention_grad_bf16(*[None] * 8, 0, 0, 0, 0, 0, None, 1.0, None, None, 1, 1)
    if code == 0:
        assert dll.pc_transpose_bf16_f32(None, None, 0, 0, 1) == -3 and empty_attention_grad == -3
    else:  # everything but the attention backward, which needs AVX512-BF16
        assert dll.pc_transpose_bf16_f32(None, None, 0, 0, 1) == 0 and empty_attention_grad == -4
