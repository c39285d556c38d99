"""The `polycoder` command line: one verb a stage, each verb a typed Python function.

A verb's function signature is the one source of its options and defaults: the parser is
built from the annotations and the docstring's `Args:` section, so `polycoder data collect`
and `polycoder.data.collect.collect(...)` cannot drift apart. Only the module of the verb
being run is imported, so `polycoder generate` does not pay for the server or the data
pipeline's imports.

Conventions for verb functions:
- `x: int = 3` becomes `--x 3`; underscores become dashes (`max_new_tokens` -> `--max-new-tokens`).
- `bool` becomes `--flag / --no-flag`.
- `list[T]` accepts both `--opt a b` and `--opt a --opt b`.
- `Literal[...]` gives choices; `X | None` is optional.
- `Annotated[T, POSITIONAL]` makes a positional argument (a list is `nargs="+"`).
- `Annotated[T, Alias("--old")]` accepts another name of the option; `Annotated[Literal[...],
  Spellings(fp32="float32")]` other spellings of its values (a dataclass field says the same
  with `metadata={"aliases": ..., "spellings": ...}`).
- A parameter without a default is a required option.
- A dataclass parameter (`ModelOptions`) becomes one option a field, with the help of the
  field's metadata; `Annotated[..., Fields(...)]` keeps only some fields, and a field named
  like one of the verb's own parameters is left to that parameter.

Library modules never import this one; the verbs' shared vocabulary is `polycoder.options`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import polycoder
from polycoder import __version__
from polycoder.errors import PolycoderError
from polycoder.options import POSITIONAL, Alias, Fields, Spellings

# verb (possibly two words) -> "module:function"
COMMANDS: dict[str, str] = {
    "generate": "polycoder.generation.cli:cli_generate",
    "tokenize": "polycoder.tokenizer.cli:cli_tokenize",
    "data fetch": "polycoder.data.fetch:fetch_corpus",
    "data collect": "polycoder.data.collect:collect",
    "data split": "polycoder.data.split:split",
    "data tokenize": "polycoder.data.tokenize:tokenize_corpus",
    "data overlap": "polycoder.data.overlap:overlap",
    "tokenizer train": "polycoder.tokenizer.train:train_tokenizer",
    "train": "polycoder.train.pretrain:train",
    "finetune": "polycoder.train.finetune:finetune",
    "eval perplexity": "polycoder.eval.perplexity:perplexity",
    "eval humaneval": "polycoder.eval.humaneval:humaneval",
    "eval infilling": "polycoder.eval.infilling:infilling",
    "eval contamination": "polycoder.eval.contamination:contamination",
    "serve": "polycoder.serve.app:serve",
    "export gguf": "polycoder.export.gguf:export_gguf",
    "convert neox": "polycoder.convert.neox:convert_neox",
}

# verb's first word -> the pyproject extra that holds what it imports
EXTRAS = {"data": "data", "tokenizer": "data", "train": "train", "finetune": "train", "eval": "eval",
          "serve": "serve", "export": "export"}


def _source(target: str) -> Path:
    """The source file of a verb's module, found without importing it or its package (whose
    `__init__` may import torch)."""
    path = Path(polycoder.__file__).parent.joinpath(*target.split(":")[0].split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _available(target: str) -> bool:
    return _source(target).is_file()


def _load(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _doc_params(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The summary line and the `Args:` entries of a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ")
    params: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args:
            if line and not line.startswith(" "):
                break
            m = re.match(r"^\s{2,4}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
            if m:
                current = m.group(1)
                params[current] = m.group(2)
            elif current and line.strip():
                params[current] += " " + line.strip()
    return summary, params


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _converter(tp: Any, spellings: dict[str, Any] | None = None) -> tuple[Callable[[str], Any] | None, list[Any] | None]:
    """(type conversion, choices) for one scalar annotation; `spellings` maps other spellings of
    a value to the value."""
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        kind = type(choices[0])
        if spellings:
            def spelled(text: str) -> Any:
                return kind(spellings.get(text, text))
            spelled.__name__ = kind.__name__  # argparse names the type in its "invalid value" message
            return spelled, choices
        return kind, choices
    if tp in (str, int, float, Path):
        return tp, None
    return str, None


def _markers(tp: Any) -> tuple[Any, bool, tuple[str, ...], dict[str, Any] | None]:
    """(the annotation without Annotated, positional?, aliases, spellings) of one annotation."""
    if get_origin(tp) is not Annotated:
        return tp, False, (), None
    extras = get_args(tp)[1:]
    aliases = tuple(flag for m in extras if isinstance(m, Alias) for flag in m.flags)
    spellings = next((m for m in extras if isinstance(m, Spellings)), None)
    return get_args(tp)[0], POSITIONAL in extras, aliases, spellings


def _options_class(tp: Any) -> tuple[type | None, tuple[str, ...] | None]:
    """(the dataclass, the fields to show or None for all) of a dataclass parameter's annotation."""
    shown = None
    if get_origin(tp) is Annotated:
        shown = next((m.names for m in get_args(tp)[1:] if isinstance(m, Fields)), None)
        tp = get_args(tp)[0]
    tp = _unwrap_optional(tp)
    return (tp, shown) if dataclasses.is_dataclass(tp) and isinstance(tp, type) else (None, None)


def _arguments(fn: Callable[..., Any]):
    """(name, annotation, has_default, default, help) of every option of `fn`, with the fields of
    its dataclass parameters in their place."""
    hints = typing.get_type_hints(fn, include_extras=True)
    _, helps = _doc_params(fn)
    params = inspect.signature(fn).parameters
    out = []
    for name, param in params.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        tp = hints.get(name, str)
        cls, shown = _options_class(tp)
        if cls is not None:
            field_hints = typing.get_type_hints(cls, include_extras=True)
            for f in dataclasses.fields(cls):
                if f.name in params or (shown is not None and f.name not in shown):
                    continue  # the verb's own parameter of that name wins
                tp = field_hints[f.name]
                extras = [Alias(*f.metadata.get("aliases", ())), Spellings(f.metadata.get("spellings", {}))]
                out.append((f.name, Annotated[(tp, *extras)], True, f.default, f.metadata.get("help", "")))
            continue
        has_default = param.default is not inspect.Parameter.empty
        out.append((name, tp, has_default, param.default if has_default else None, helps.get(name, "")))
    return out


def add_function_arguments(parser: argparse.ArgumentParser, fn: Callable[..., Any]) -> None:
    """Add one argument to `parser` for each option of `fn` (see the module)."""
    for name, tp, has_default, default, help_text in _arguments(fn):
        tp, positional, aliases, spellings = _markers(tp)
        tp = _unwrap_optional(tp)
        if has_default and tp is bool:
            help_text += " (default: on)" if default else " (default: off)"
        elif has_default and default is not None:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        flags = ["--" + name.replace("_", "-"), *aliases]
        is_list = get_origin(tp) in (list, tuple)
        if positional:
            conv, choices = _converter(get_args(tp)[0] if is_list else tp, spellings)
            nargs = ("*" if has_default else "+") if is_list else ("?" if has_default else None)
            parser.add_argument(name, type=conv, choices=choices, nargs=nargs, default=default,
                                help=help_text, metavar=name.upper())
        elif tp is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=bool(default), help=help_text)
        elif is_list:
            conv, choices = _converter(get_args(tp)[0], spellings)
            parser.add_argument(*flags, dest=name, type=conv, choices=choices, nargs="+",
                                action="extend", default=None, required=not has_default,
                                help=help_text)
        else:
            conv, choices = _converter(tp, spellings)
            parser.add_argument(*flags, dest=name, type=conv, choices=choices, default=default,
                                required=not has_default, help=help_text)


def call_from_args(fn: Callable[..., Any], ns: argparse.Namespace) -> Any:
    """Call `fn` with the parsed arguments; list options left unset get their defaults, and
    a dataclass parameter is built from its fields' options."""
    hints = typing.get_type_hints(fn, include_extras=True)
    kwargs = {}
    for name, param in inspect.signature(fn).parameters.items():
        cls, _ = _options_class(hints.get(name, str))
        if cls is not None:
            values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
                      if hasattr(ns, f.name) and f.name not in kwargs and f.name not in inspect.signature(fn).parameters}
            kwargs[name] = cls(**{k: v for k, v in values.items() if v is not None})
            continue
        if not hasattr(ns, name):
            continue
        value = getattr(ns, name)
        if value is None and param.default is not inspect.Parameter.empty:
            value = param.default
        kwargs[name] = value
    return fn(**kwargs)


def _summary(target: str) -> str:
    """The first line of a verb function's docstring, read from its source without importing
    it (so `polycoder --help` never pays for torch)."""
    func = target.split(":")[1]
    try:
        tree = ast.parse(_source(target).read_text(encoding="utf-8"))
    except OSError:
        return ""
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func), None)
    doc = ast.get_docstring(fn) if fn is not None else None
    return (doc or "").split("\n\n")[0].replace("\n", " ")


def _usage(group: str | None = None) -> str:
    verbs = [v for v in COMMANDS if group is None or v.split()[0] == group]
    head = f"polycoder {group} VERB" if group else "polycoder VERB"
    lines = [f"usage: {head} [options]   (polycoder VERB --help for a verb's options)", "", "verbs:"]
    width = max(len(v) for v in verbs) + 2
    for verb in verbs:
        if _available(COMMANDS[verb]):
            lines.append(f"  {verb:<{width}}{_summary(COMMANDS[verb])}")
    if group is None:
        lines += ["", "  -V, --version  print the version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader went away (`polycoder generate | head`): stop quietly, as `cat` does. Python
        # would otherwise print a traceback, and again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a program killed by a closed pipe


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] in ("--version", "-V"):
        print(__version__)
        return
    verb = next((v for v in sorted(COMMANDS, key=len, reverse=True)
                 if argv[: len(v.split())] == v.split()), None)
    groups = sorted({v.split()[0] for v in COMMANDS})
    if verb is None and argv[0] in groups and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        print(_usage(argv[0]))  # `polycoder data` or `polycoder data --help`: the group's verbs
        return
    if verb is None or not _available(COMMANDS[verb]):
        what = " ".join(argv[:2]) if argv[0] in groups else argv[0]
        print(f"polycoder: unknown verb {what!r}; choose one of: {', '.join(groups)}\n", file=sys.stderr)
        print(_usage(argv[0] if argv[0] in groups else None), file=sys.stderr)
        sys.exit(2)
    try:
        fn = _load(COMMANDS[verb])
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "polycoder":
            raise
        extra = EXTRAS.get(verb.split()[0], "all")
        print(f"polycoder {verb}: needs the package {e.name!r}, which is not installed: "
              f"pip install 'polycoder[{extra}]' (or 'polycoder[all]' for every stage)", file=sys.stderr)
        sys.exit(2)
    summary, _ = _doc_params(fn)
    parser = argparse.ArgumentParser(prog=f"polycoder {verb}", description=summary.replace("%", "%%"))
    add_function_arguments(parser, fn)
    ns = parser.parse_args(argv[len(verb.split()):])
    try:
        result = call_from_args(fn, ns)
    except PolycoderError as e:
        print(f"polycoder {verb}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"polycoder {verb}: interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)
