"""Reading the text and record data the recipes train on, with clear errors and public defaults.

Records come from a "source spec" (see read_records): a JSON, JSON lines, Parquet or CSV file, a folder written by
datasets' save_to_disk, or a Hugging Face Hub dataset. Library code: every problem is a NanotuneError naming the
file (and the line or record); the scripts turn it into one `error:` line."""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.request
from pathlib import Path

from ..utils import ROOT, NanotuneError, atomic_write

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


FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")  # a spec ending so is a local file, never a Hub name
HUB_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]*){0,2}$")  # name or org/name, then :config:split


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first `limit` records (all when None) of a source spec, each a dict:
    - a JSON list of objects, or JSON lines (errors give the file's own line number);
    - a .parquet file (a row's missing values are None; nested lists and structs become lists and dicts);
    - a .csv file with a header line (every value a string);
    - a folder written by datasets' save_to_disk: FOLDER, or FOLDER:SPLIT for a DatasetDict (default train);
    - a Hugging Face Hub dataset: org/name, org/name:split or org/name:config:split (default split train),
      taken as one only when the spec is not a local path and does not end in a file suffix.
    Parquet, folders and the Hub need the `data` extra (pyarrow, datasets), imported only when used."""
    spec, path = str(path), Path(path)
    folder, _, split = spec.rpartition(":")
    if path.is_dir():
        records = read_saved(path, None, limit)
    elif not path.exists() and folder and Path(folder).is_dir():
        records = read_saved(Path(folder), split, limit)
    elif path.is_file() and path.suffix.lower() == ".parquet":
        records = read_parquet(path, limit)
    elif path.is_file() and path.suffix.lower() == ".csv":
        records = read_csv(path, limit)
    elif not path.exists() and is_hub_name(spec):
        records = read_hub(spec, limit)
    else:  # JSON, or a local file that does not exist (read_text says so)
        records = read_json(path)
    if limit is not None:
        del records[limit:]  # in place: no second list of a large file
    if not records:
        raise NanotuneError(f"data file {path} holds no examples")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise NanotuneError(f"{path}: record {i} is a {type(r).__name__}, expected an object")
    return records


def read_json(path: Path) -> list:
    """A JSON list, or JSON lines."""
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
    return records


def read_csv(path: Path, limit: int | None) -> list[dict]:
    """A CSV file with a header line, read as UTF-8 (read_text's clear error otherwise); every value a string."""
    text = read_text(path).removeprefix("\ufeff")  # the byte-order mark Excel writes
    reader = csv.DictReader(io.StringIO(text))
    records = []
    try:
        for row in reader:
            # DictReader files a missing value as None and extra ones under the key None: both are errors here
            if None in row or None in row.values():
                n = len(reader.fieldnames) + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise NanotuneError(
                    f"{path}: line {reader.line_num} has {n} values, but the header names {len(reader.fieldnames)}"
                )
            records.append(row)
            if limit is not None and len(records) >= limit:
                break
    except csv.Error as e:
        raise NanotuneError(f"{path}: line {reader.line_num} is not valid CSV ({e})") from None
    return records


def missing_package(package: str, spec) -> NanotuneError:
    return NanotuneError(f'reading {spec} needs the {package!r} package: pip install -e ".[data]"')


def read_parquet(path: Path, limit: int | None) -> list[dict]:
    """A Parquet file's rows, a batch at a time: with a limit, only the batches that hold the first `limit` rows."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_package("pyarrow", path) from None
    records = []
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=min(limit or 65536, 65536)):
            records.extend(batch.to_pylist())
            if limit is not None and len(records) >= limit:
                break
    except (OSError, pa.ArrowException) as e:
        raise NanotuneError(f"{path} is not a readable Parquet file ({short(e)})") from None
    return records


def read_saved(folder: Path, split: str | None, limit: int | None) -> list[dict]:
    """A folder written by Dataset.save_to_disk, or DatasetDict.save_to_disk and a split (default train)."""
    if not (folder / "state.json").is_file() and not (folder / "dataset_dict.json").is_file():
        raise NanotuneError(f"{folder} is a folder, neither a data file nor a dataset written by save_to_disk")
    try:
        import datasets
    except ImportError:
        raise missing_package("datasets", folder) from None
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # a damaged folder, or one datasets cannot load back (it fails on 0 rows): one line
        raise NanotuneError(f"could not read the dataset folder {folder} ({short(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise NanotuneError(f"{folder} holds the splits {', '.join(ds)}, not {name!r}: name one as {folder}:SPLIT")
        ds = ds[name]
    elif split is not None:
        raise NanotuneError(f"{folder} holds one dataset, not splits: leave out ':{split}'")
    return dataset_rows(ds, limit)


def is_hub_name(spec: str) -> bool:
    """Whether a spec reads as org/name[:config][:split] and not as a file (the caller checks it does not exist)."""
    return bool(HUB_SPEC.match(spec)) and not spec.split(":")[0].lower().endswith(FILE_SUFFIXES)


def read_hub(spec: str, limit: int | None) -> list[dict]:
    """A Hugging Face Hub dataset: org/name, org/name:split, org/name:config:split (from the local cache offline)."""
    name, *parts = spec.split(":")
    config, split = ([None, None] + parts)[-2:]  # one part is the split; two are the config, then the split
    try:
        import datasets
    except ImportError:
        raise missing_package("datasets", spec) from None
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # anything the Hub, the cache or a dataset's files raise: one line, not a traceback
        if is_offline(e):
            raise NanotuneError(
                f"could not load the Hub dataset {spec} (offline and not in the local cache: {short(e)}); "
                "download it once with network, or pass a local file"
            ) from None
        raise NanotuneError(f"could not load the Hub dataset {spec} ({short(e)}), and it is no local file") from None
    return dataset_rows(ds, limit)


def is_offline(e: BaseException) -> bool:
    """Whether a Hub error (or one it was raised from) says the network is off or out of reach."""
    while e is not None:
        words = f"{type(e).__name__} {e}".lower()
        if isinstance(e, ConnectionError) or any(w in words for w in ("offline", "connect", "couldn't reach")):
            return True
        e = e.__cause__ or e.__context__
    return False


def short(e: BaseException) -> str:
    """An exception as a short reason: its type and first line, at most 200 characters."""
    text = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return text if len(text) <= 200 else text[:197] + "..."


def dataset_rows(ds, limit: int | None) -> list[dict]:
    """A datasets.Dataset's first `limit` rows as dicts (selected before converting: no copy of the rest)."""
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds.to_list()
