"""Text for training and evaluation: WikiText-2 or local files, tokenized once into windows.

`wikitext2` comes from the Hugging Face Hub through `datasets`, or from the directory
named by `TAPC_DATA_DIR` (offline machines and CI). A local dataset is a directory with
`train.txt`, `validation.txt` and `test.txt`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UsageError

SPLITS = ("train", "validation", "test")
VALIDATION_FALLBACK = 0.05  # share of train held out when validation.txt is missing


@dataclass
class TextDataset:
    texts: dict[str, str]
    source: str
    notes: list[str] = field(default_factory=list)  # anything the report must say


def load_texts(dataset: str) -> TextDataset:
    """Return the train, validation and test text of `dataset`."""
    if dataset == "wikitext2":
        local = os.environ.get("TAPC_DATA_DIR")
        if local:
            return _load_directory(Path(local), f"wikitext2 (TAPC_DATA_DIR={local})")
        return _load_wikitext2_hub()
    path = Path(dataset).expanduser()
    if not path.exists():
        raise UsageError(
            f"dataset {dataset!r} not found: give 'wikitext2' or a directory with train.txt, "
            "validation.txt and test.txt"
        )
    return _load_directory(path, str(path.resolve()))


def _load_directory(path: Path, label: str) -> TextDataset:
    if not path.is_dir():
        raise UsageError(f"dataset {path} is not a directory; give one with train.txt, validation.txt and test.txt")
    missing = [s for s in ("train", "test") if not (path / f"{s}.txt").is_file()]
    if missing:
        raise UsageError(f"dataset {path} has no {missing[0]}.txt; it needs train.txt and test.txt (validation.txt optional)")
    texts = {s: (path / f"{s}.txt").read_text(encoding="utf-8") for s in ("train", "test")}
    notes = []
    if (path / "validation.txt").is_file():
        texts["validation"] = (path / "validation.txt").read_text(encoding="utf-8")
    else:
        lines = texts["train"].splitlines(keepends=True)
        cut = len(lines) - max(1, int(len(lines) * VALIDATION_FALLBACK))
        texts["train"], texts["validation"] = "".join(lines[:cut]), "".join(lines[cut:])
        notes.append(f"no validation.txt: the last {len(lines) - cut} lines of train.txt are used for validation")
    for split, text in texts.items():
        if not text.strip():
            raise UsageError(f"dataset {path}: {split} text is empty; put text in it")
    return TextDataset(texts=texts, source=label, notes=notes)


def _load_wikitext2_hub() -> TextDataset:
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception as exc:  # network errors come in many types
        text = " ".join(str(exc).split())[:160]
        raise UsageError(
            f"could not download WikiText-2 from the Hugging Face Hub ({text}); set TAPC_DATA_DIR "
            "to a directory with train.txt, validation.txt and test.txt, or pass --dataset DIR"
        ) from None
    # Rows keep their trailing newlines, so joining them restores the raw files.
    texts = {split: "".join(ds[split]["text"]) for split in SPLITS}
    return TextDataset(texts=texts, source="wikitext-2-raw-v1 (Hugging Face Hub)")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of exactly `seq_len` tokens, shape (n, seq_len); the tail is dropped."""
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)
