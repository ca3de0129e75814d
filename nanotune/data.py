"""Reading the text and JSON data the recipes train on, with clear errors and public defaults.

Library code: every problem is a NanotuneError naming the file (and the line or record); the scripts turn it
into one `error:` line."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from .utils import ROOT, NanotuneError, atomic_write

DATA_DIR = ROOT / "data"
GULLIVER_URL = "https://www.gutenberg.org/cache/epub/829/pg829.txt"
INSTRUCTIONS_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
)
PREFERENCES_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
    "instruction-data-with-preference.json"
)


def default_file(name: str, url: str, flag: str = "--data") -> Path:
    """data/<name>, downloaded once from url when missing (written atomically: never half a file); flag names the
    option that points at a local copy instead."""
    path = DATA_DIR / name
    if path.is_file() and path.stat().st_size > 0:
        return path
    print(f"downloading {url} -> {path}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise NanotuneError(
            f"could not download the default data file {url} ({e}); pass {flag} PATH to a local copy"
        ) from None
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path


def read_text(path: str | Path) -> str:
    """A UTF-8 text file with its line endings made "\\n" (as open() reads text), or a NanotuneError that says where
    the first byte that is not UTF-8 is."""
    path = Path(path)
    if not path.is_file():
        raise NanotuneError(f"data file {path} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise NanotuneError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


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
    text = strip_gutenberg(read_text(path))
    if not text.strip():
        raise NanotuneError(f"data file {path} is empty (after removing the Project Gutenberg header and footer)")
    return text


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """A JSON list of objects, or JSON lines (errors give the file's own line number); the first `limit`."""
    text = read_text(path).strip()
    if not text:
        raise NanotuneError(f"data file {path} is empty")
    if text.startswith("[") or (text.startswith("{") and "\n" in text and text.endswith("}") and is_json(text)):
        try:  # a JSON list (or, by mistake, one object written over several lines: refused below)
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise NanotuneError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}, column {e.colno})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise NanotuneError(
                        f"{path}: line {number} is not valid JSON ({e.msg}, column {e.colno}); "
                        "expected a JSON list or one JSON object per line"
                    ) from None
    if not isinstance(records, list):
        what = f"an object with keys {', '.join(list(records)[:5])}" if isinstance(records, dict) else "a single value"
        raise NanotuneError(f"{path} holds {what}, not records: expected a JSON list of objects, or one per line")
    records = records[:limit]
    if not records:
        raise NanotuneError(f"data file {path} holds no examples")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise NanotuneError(f"{path}: record {i} is a {type(r).__name__}, expected an object")
    return records
