"""The data pipeline: fetch code, clean and deduplicate it, split it, tokenize it.

    polycoder data fetch --out CACHE                   fetch/ (a pinned manifest of Debian, npm, PyPI sources)
    polycoder data collect SOURCE... --out CORPUS     collect.py (sources.py, languages.py, dedup.py)
    polycoder data split CORPUS --out SPLIT           split.py
    polycoder tokenizer train SPLIT --out TOK         polycoder.tokenizer.train
    polycoder data tokenize SPLIT --tokenizer TOK --out TOKENS   tokenize.py
    polycoder data overlap --index SPLIT/train/index.tsv EVAL...  overlap.py

Corpus shards and the index are described in polycoder.corpus (the format the evaluation
and tokenizer training read too), token shards in polycoder.token_shards, and how the stages run in
parallel (datatrove executors, local here, Slurm/Ray elsewhere) in engine.py.
"""
