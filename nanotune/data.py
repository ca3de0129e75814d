"""Reading the text and JSON data the recipes train on, with clear errors and public defaults."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from .utils import ROOT, die

DATA_DIR = ROOT / "data"
GULLIVER_URL = "https://www.gutenberg.org/cache/epub/829/pg829.txt"
INSTRUCTIONS_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
)
PREFERENCES_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
    "instruction-data-with-preference.json"
)


def default_file(name: str, url: str) -> Path:
    """data/<name>, downloaded once from url when missing."""
    path = DATA_DIR / name
    if path.is_file() and path.stat().st_size > 0:
        return path
    print(f"downloading {url} -> {path}", flush=True)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        die(f"could not download the default data file ({e}); pass --data PATH to a local copy")
    path.write_bytes(data)
    return path


def strip_gutenberg(text: str) -> str:
    """Keep what lies between Project Gutenberg's '*** START OF' and '*** END OF' lines (if present)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF")), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), None)
    if start is not None:
        lines = lines[start + 1 : end if end is not None and end > start else None]
    elif end is not None:
        lines = lines[:end]
    return "".join(lines).strip()


def read_book(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        die(f"data file {path} does not exist")
    text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
    if not text.strip():
        die(f"data file {path} is empty (after removing the Project Gutenberg header and footer)")
    return text


def read_records(path: str | Path) -> list[dict]:
    """A JSON list of objects, or JSON lines."""
    path = Path(path)
    if not path.is_file():
        die(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        die(f"data file {path} is empty")
    try:
        records = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        die(f"{path} is neither a JSON list nor JSON lines: {e}")
    if not records:
        die(f"data file {path} holds no examples")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            die(f"{path}: example {i} is a {type(r).__name__}, expected an object")
    return records
