"""read_records' source specs: JSON, JSON lines, Parquet, CSV, datasets' save_to_disk folders and Hub names, each
written here and read back as the same records, with one-line errors. Never the network: the Hub is faked, or
reached offline in a subprocess whose sockets refuse to connect."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanotune.data.sources import read_records
from nanotune.utils import NanotuneError

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    {"instruction": "Name a river.", "input": "", "output": "The Nile."},
    {"instruction": "Add 2 and 3.", "input": "2, 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
CHATS = [  # a nested list<struct<role, content>> column, and a row without "system" (Arrow fills in None)
    {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    {"messages": [{"role": "user", "content": "Sky?"}]},
]


def refused(spec, limit=None) -> str:
    with pytest.raises(NanotuneError) as e:
        read_records(spec, limit)
    message = str(e.value)
    assert "\n" not in message, message  # one line, as the scripts print it
    return message


def test_json_list_and_json_lines(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS, indent=1))
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name in ("list.json", "lines.jsonl"):
        assert read_records(tmp_path / name) == ROWS
        assert read_records(str(tmp_path / name), 2) == ROWS[:2]


def test_parquet_keeps_nested_columns_and_fills_a_missing_key_with_none(tmp_path):
    pq.write_table(pa.Table.from_pylist(CHATS), tmp_path / "chats.parquet")
    assert read_records(tmp_path / "chats.parquet") == [CHATS[0], {"system": None, **CHATS[1]}]
    assert read_records(tmp_path / "chats.parquet", 1) == CHATS[:1]


def test_parquet_limit_reads_only_the_batches_it_needs(tmp_path, monkeypatch):
    rows = [{"i": i, "text": f"row {i}"} for i in range(1000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=100)
    pulled = []
    iter_batches = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    assert read_records(tmp_path / "big.parquet", 3) == rows[:3]
    assert pulled == [3]
    assert read_records(tmp_path / "big.parquet") == rows


def test_csv_reads_quoted_commas_quotes_and_newlines_as_strings(tmp_path):
    rows = [
        {"instruction": "List, then stop", "input": 'say "hi"', "output": "one\ntwo"},
        {"instruction": "Count", "input": "", "output": "3"},
        {"instruction": "Ünïcode ✓", "input": " spaced ", "output": "4.5"},
    ]
    with open(tmp_path / "data.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    assert read_records(tmp_path / "data.csv") == rows
    assert read_records(tmp_path / "data.csv", 2) == rows[:2]
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfa,b\r\n1,2\r\n")  # a byte-order mark and CRLF, as Excel writes
    assert read_records(tmp_path / "excel.csv") == [{"a": "1", "b": "2"}]


def test_csv_row_with_a_missing_or_extra_value_names_the_line(tmp_path):
    (tmp_path / "short.csv").write_text('a,b,c\n1,2,3\n"x\ny",5\n')
    assert refused(tmp_path / "short.csv") == f"{tmp_path / 'short.csv'}: line 4 has 2 values, but the header names 3"
    (tmp_path / "long.csv").write_text("a,b\n1,2\n3,4,5,6\n")
    assert refused(tmp_path / "long.csv") == f"{tmp_path / 'long.csv'}: line 3 has 4 values, but the header names 2"
    assert read_records(tmp_path / "long.csv", 1) == [{"a": "1", "b": "2"}]  # the bad line lies past the limit


def test_csv_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "latin.csv").write_bytes("a,b\n1,2\ncafé,3\n".encode("latin-1"))
    assert refused(tmp_path / "latin.csv") == (
        f"{tmp_path / 'latin.csv'} is not UTF-8 text (byte 0xe9 at offset 11, line 3); "
        "convert it, e.g. iconv -f latin1 -t utf-8"
    )


def test_saved_dataset_folder(tmp_path, monkeypatch):
    datasets.Dataset.from_list(CHATS).save_to_disk(tmp_path / "ds")
    assert read_records(tmp_path / "ds") == [CHATS[0], {"system": None, **CHATS[1]}]
    converted = []  # how many rows became Python dicts: with a limit, only those kept
    to_list = datasets.Dataset.to_list
    monkeypatch.setattr(datasets.Dataset, "to_list", lambda self: converted.append(len(self)) or to_list(self))
    assert read_records(str(tmp_path / "ds"), 1) == CHATS[:1]
    assert converted == [1]
    assert refused(f"{tmp_path / 'ds'}:test") == f"{tmp_path / 'ds'} holds one dataset, not splits: leave out ':test'"


def test_saved_dataset_dict_reads_the_split_named_after_a_colon(tmp_path):
    splits = {"train": ROWS[:2], "test": ROWS[2:] + ROWS[:1]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp_path / "dd")
    assert read_records(tmp_path / "dd") == splits["train"]
    assert read_records(f"{tmp_path / 'dd'}:test") == splits["test"]
    assert read_records(f"{tmp_path / 'dd'}:test", 1) == splits["test"][:1]
    assert refused(f"{tmp_path / 'dd'}:dev") == (
        f"{tmp_path / 'dd'} holds the splits train, test, not 'dev': name one as {tmp_path / 'dd'}:SPLIT"
    )


def test_saved_dataset_dict_without_train_lists_its_splits(tmp_path):
    parts = {"validation": ROWS[:1], "test": ROWS[1:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(tmp_path / "dd")
    assert refused(tmp_path / "dd") == (
        f"{tmp_path / 'dd'} holds the splits validation, test, not 'train': name one as {tmp_path / 'dd'}:SPLIT"
    )
    assert read_records(f"{tmp_path / 'dd'}:validation") == ROWS[:1]


def test_a_folder_that_is_no_saved_dataset_says_so(tmp_path):
    (tmp_path / "plain").mkdir()
    message = refused(tmp_path / "plain")
    assert message == f"{tmp_path / 'plain'} is a folder, neither a data file nor a dataset written by save_to_disk"


def test_hub_names_give_name_config_and_split(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read_records("org/name") == ROWS
    assert read_records("org/name:test", 2) == ROWS[:2]
    assert read_records("org/name:cfg:validation") == ROWS
    assert read_records("squad") == ROWS
    assert calls == [
        ("org/name", None, "train"),
        ("org/name", None, "test"),
        ("org/name", "cfg", "validation"),
        ("squad", None, "train"),
    ]


def test_hub_errors_are_one_line(monkeypatch):
    def offline(*args, **kwargs):
        try:
            raise ConnectionError("[Errno 101] Network is unreachable")
        except ConnectionError as e:  # the way an HTTP client's error wraps a socket's: the cause tells
            raise RuntimeError("Max retries exceeded with url: /api/datasets/org/name") from e

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert refused("org/name:test") == (
        "could not load the Hub dataset org/name:test (offline and not in the local cache: RuntimeError: Max "
        "retries exceeded with url: /api/datasets/org/name); download it once with network, or pass a local file"
    )

    def not_found(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'org/name' doesn't exist on the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    assert refused("org/name") == (
        "could not load the Hub dataset org/name (DatasetNotFoundError: Dataset 'org/name' doesn't exist on the Hub), "
        "and it is no local file"
    )


def test_hub_name_offline_and_not_cached_is_one_line(tmp_path):
    # a real datasets.load_dataset, offline, with an empty cache; sockets refuse to connect in case it still tried
    code = (
        "import socket, sys\n"
        "def refuse(*args): raise AssertionError('the test reached for the network')\n"
        "socket.socket.connect = refuse\n"
        "from nanotune.data.sources import read_records\n"
        "from nanotune.utils import NanotuneError\n"
        "try:\n"
        "    read_records(sys.argv[1])\n"
        "except NanotuneError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run(
        [sys.executable, "-c", code, "nanotune-tests/never-cached:test"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith(
        "could not load the Hub dataset nanotune-tests/never-cached:test (offline and not in the local cache: "
    ), lines[0]
    assert lines[0].endswith("); download it once with network, or pass a local file"), lines[0]


def test_local_looking_specs_that_do_not_exist_are_never_hub_names(tmp_path, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise AssertionError("a Hub lookup")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    for spec in ("my_missing.jsonl", "some/dir/file.parquet", "data.csv", "org/name.json:train", "a/b/c", "./x"):
        assert refused(spec) == f"data file {spec.removeprefix('./')} does not exist"
    (tmp_path / "data").mkdir()  # an existing file that reads like a Hub name is read as the file
    (tmp_path / "data" / "instructions").write_text(json.dumps(ROWS))
    assert read_records("data/instructions") == ROWS


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert refused(tmp_path / "rows.parquet") == (
        f"reading {tmp_path / 'rows.parquet'} needs the 'pyarrow' package: pip install -e \".[data]\""
    )
    assert (
        refused(tmp_path / "ds")
        == f"reading {tmp_path / 'ds'} needs the 'datasets' package: pip install -e \".[data]\""
    )
    assert refused("org/name") == "reading org/name needs the 'datasets' package: pip install -e \".[data]\""
    (tmp_path / "rows.csv").write_text("a\n1\n")  # CSV and JSON need neither
    assert read_records(tmp_path / "rows.csv") == [{"a": "1"}]


def test_empty_sources_and_broken_files(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS).slice(0, 0), tmp_path / "empty.parquet")
    (tmp_path / "header.csv").write_text("instruction,output\n")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    for name in ("empty.parquet", "header.csv"):
        assert refused(tmp_path / name) == f"data file {tmp_path / name} holds no examples"
    for name in ("header.csv", "ds"):
        assert refused(tmp_path / name, 0) == f"data file {tmp_path / name} holds no examples"
    (tmp_path / "ds" / "state.json").write_text("{")
    assert refused(tmp_path / "ds").startswith(
        f"could not read the dataset folder {tmp_path / 'ds'} (JSONDecodeError: "
    )
    (tmp_path / "fake.parquet").write_text("not parquet")
    assert refused(tmp_path / "fake.parquet").startswith(
        f"{tmp_path / 'fake.parquet'} is not a readable Parquet file (ArrowInvalid: "
    )
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "ints.parquet")
    assert read_records(tmp_path / "ints.parquet") == [{"x": 1}, {"x": 2}]
