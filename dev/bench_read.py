"""The cost of reading a large dataset as SFT reads it: N records (the bundled instruction set repeated, each made
distinct) written as JSONL and as Parquet, then each read, its formats detected and tokenised into SFT's rows
in a fresh process, timed, with the process's peak resident memory (resource.getrusage) before and after.

    python dev/bench_read.py --records 100000       # needs the data extra (pyarrow) for the Parquet half
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (Linux: KiB)


def read_one(path: str):
    """In this process: read, detect, split and tokenise as train_sft.py does; print one JSON line."""
    from nanotune import load_tokenizer
    from nanotune.data.instruct import encode_example, load_examples, split_examples

    enc = load_tokenizer()
    enc.encode_ordinary("warm up")
    base = peak_mib()
    start = time.perf_counter()
    examples = load_examples(path, "sft")
    read = time.perf_counter() - start
    train, val, _ = split_examples(examples, 1337)
    rows = [encode_example(enc, ex, "alpaca", 256, "")[:2] for ex in train + val]
    total = time.perf_counter() - start
    tokens = sum(len(ids) for ids, _ in rows)
    print(
        json.dumps(
            {
                "file": Path(path).name,
                "records": len(examples),
                "tokens": tokens,
                "read_s": round(read, 2),
                "read_and_tokenise_s": round(total, 2),
                "peak_mib_before": round(base),
                "peak_mib_after": round(peak_mib()),
            }
        )
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "instruction-data.json"))
    p.add_argument("--read", help=argparse.SUPPRESS)  # (the child process's job)
    args = p.parse_args()
    if args.read:
        return read_one(args.read)
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = json.loads(Path(args.data).read_text())
    records = [
        dict(base[i % len(base)], instruction=f"{base[i % len(base)]['instruction']} ({i})")
        for i in range(args.records)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, parquet = Path(tmp) / "records.jsonl", Path(tmp) / "records.parquet"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        pq.write_table(pa.Table.from_pylist(records), parquet)
        for path in (jsonl, parquet):
            size = path.stat().st_size / 2**20
            print(f"{path.name}: {size:.1f} MiB on disk", flush=True)
            subprocess.run([sys.executable, __file__, "--read", str(path)], check=True)


if __name__ == "__main__":
    main()
