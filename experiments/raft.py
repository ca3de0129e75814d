"""Answers grounded in documents, measured on ground truth: RAG and RAFT (Zhang et al. 2024) against closed-book
SFT on a generated world of fictional people, places and organisations, then one model trained on three tasks
at once against each task alone.

Part 1. A seeded world: each entity has a few attributes, written as one short document in sentence forms drawn
at random; every attribute gives a question whose gold passage is the one that states it. The entities are
split: questions about the training entities are trained on; the held-out entities' questions are answerable
only from their documents. On the held-out questions, exact match and token F1 of
    nano + RAG                       no training
    SFT closed book, without / with RAG   train_sft.py on the training questions alone
    RAFT p = 1.0, 0.8, 0.5, 0 + RAG  train_raft.py, 3 random distractors
each asked with the top 1, 3 and 5 BM25 passages, and with 3 passages with the gold one forced in; and the
retriever's recall@k.

Part 2. One model on a mixture (train_sft.py --mix 1,1,1) of the entity questions (RAFT examples written out
once, p = 0.8), book attribution (which of the 15 bundled novels a 48-token window comes from; the test windows
come from the last 2% of each book, which nano's pretraining held out) and the instruction set; against each
task trained alone for the same number of steps. Measured: entity exact match (3 passages), attribution
accuracy (exact match of the title), the instruction set's held-out perplexity (train_sft.py's validation
split).

    python experiments/raft.py --out out/raft-exp              # the full run (about an hour on 2 CPU cores)
    python experiments/raft.py --quick --out out/raft-quick    # fewer entities, settings and steps

Every training run is an ordinary command, printed before it runs (a finished one is not run again); every
point of the tables is `python -m nanotune.qa ...` or a run's summary, and the table names the command.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the nanotune package beside this folder

from experiments.sentiment_frontier import StepFailed, interruptible, run_step  # noqa: E402
from nanotune import load_tokenizer  # noqa: E402
from nanotune import qa as qa_tool  # noqa: E402
from nanotune.data.sources import read_book  # noqa: E402
from nanotune.flags import Parser, integer  # noqa: E402
from nanotune.plot import plot_curves  # noqa: E402
from nanotune.qa import raft_example, read_questions  # noqa: E402
from nanotune.retrieval import Index, rag_content, split_passages  # noqa: E402
from nanotune.utils import atomic_write  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SYLLABLES = "ka lo mir ven tha dor is el ru sa quin bel or an fe lis gar ton mo ri vas nel ost pra um zer".split()
OCCUPATIONS = "baker glassblower cartographer weaver tanner brewer clockmaker mason potter shipwright".split()
OCCUPATIONS += "miller chandler cooper fletcher jeweller printer saddler surveyor vintner bookbinder".split()
GOODS = "salt glass wool copper silk timber cheese paper rope pottery lace tin amber cider".split()
TRADES = "banking shipping mining printing weaving brewing insurance surveying".split()
KINDS = ("Guild", "Company", "Society", "Bank", "Trust", "Works")
BOOKS = {  # corpus file -> title (the answer of the attribution task)
    "pg11": "Alice's Adventures in Wonderland",
    "pg74": "The Adventures of Tom Sawyer",
    "pg84": "Frankenstein",
    "pg120": "Treasure Island",
    "pg174": "The Picture of Dorian Gray",
    "pg215": "The Call of the Wild",
    "pg43": "Dr Jekyll and Mr Hyde",
    "pg55": "The Wonderful Wizard of Oz",
    "pg730": "Oliver Twist",
    "pg766": "David Copperfield",
    "pg1184": "The Count of Monte Cristo",
    "pg1342": "Pride and Prejudice",
    "pg1661": "The Adventures of Sherlock Holmes",
    "pg2554": "Crime and Punishment",
    "pg2701": "Moby Dick",
}

# ---------------------------------------------------------------- the generated world


def name(rng: random.Random, syllables: int, used: set) -> str:
    while True:
        word = "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()
        if word not in used:
            used.add(word)
            return word


def make_world(n_people: int, n_places: int, n_orgs: int, seed: int) -> list[dict]:
    """Entities {id, kind, name, facts: [(attribute, answer, sentence, questions)]}, their sentences in forms drawn
    at random. People live in the world's places and work for its organisations, which were founded by its people:
    a name appears in other entities' documents too (BM25's hard negatives)."""
    rng, used = random.Random(seed), set()
    places = [name(rng, 3, used) for _ in range(n_places)]
    countries = [name(rng, 2, used) for _ in range(6)]
    people = [f"{name(rng, 2, used)} {name(rng, 3, used)}" for _ in range(n_people)]
    orgs = [f"{name(rng, 2, used)} {rng.choice(KINDS)}" for _ in range(n_orgs)]
    entities = []
    for n, person in enumerate(people):
        job, city, year, org = (
            rng.choice(OCCUPATIONS),
            rng.choice(places),
            str(rng.randint(1700, 1899)),
            rng.choice(orgs),
        )
        facts = [
            (
                "occupation",
                job,
                [f"{person} is a {job} by trade.", f"{person} works as a {job}."],
                [f"What is the occupation of {person}?", f"What does {person} do for a living?"],
            ),
            (
                "home",
                city,
                [f"{person} lives in {city}.", f"{person} makes a home in {city}."],
                [f"Where does {person} live?", f"In which town does {person} live?"],
            ),
            (
                "born",
                year,
                [f"{person} was born in {year}.", f"The year of {person}'s birth was {year}."],
                [f"In which year was {person} born?", f"When was {person} born?"],
            ),
            (
                "employer",
                org,
                [f"{person} is employed by the {org}.", f"The {org} employs {person}."],
                [f"Who employs {person}?", f"Which organisation does {person} work for?"],
            ),
        ]
        entities.append({"id": f"person-{n:03d}", "kind": "person", "name": person, "facts": facts})
    for n, place in enumerate(places):
        country, river, good = rng.choice(countries), name(rng, 2, used), rng.choice(GOODS)
        year = str(rng.randint(900, 1600))
        facts = [
            (
                "country",
                country,
                [f"{place} is a town in {country}.", f"The town of {place} lies in {country}."],
                [f"In which country is {place}?", f"Which country is {place} in?"],
            ),
            (
                "river",
                river,
                [f"The river {river} runs through {place}.", f"{place} stands on the river {river}."],
                [f"Which river runs through {place}?", f"On which river does {place} stand?"],
            ),
            (
                "founded",
                year,
                [f"{place} was founded in {year}.", f"The first houses of {place} date from {year}."],
                [f"When was {place} founded?", f"In which year was {place} founded?"],
            ),
            (
                "goods",
                good,
                [f"{place} is known for its {good}.", f"The {good} of {place} is sold far away."],
                [f"What is {place} known for?", f"What does {place} make?"],
            ),
        ]
        entities.append({"id": f"place-{n:03d}", "kind": "place", "name": place, "facts": facts})
    for n, org in enumerate(orgs):
        founder, seat, trade = rng.choice(people), rng.choice(places), rng.choice(TRADES)
        year = str(rng.randint(1600, 1850))
        facts = [
            (
                "founder",
                founder,
                [f"The {org} was founded by {founder}.", f"{founder} started the {org}."],
                [f"Who founded the {org}?", f"Who started the {org}?"],
            ),
            (
                "seat",
                seat,
                [f"The {org} has its seat in {seat}.", f"The {org} is based in {seat}."],
                [f"Where is the {org} based?", f"In which town does the {org} sit?"],
            ),
            (
                "founded",
                year,
                [f"The {org} dates from {year}.", f"The {org} was set up in {year}."],
                [f"When was the {org} founded?", f"In which year was the {org} set up?"],
            ),
            (
                "trade",
                trade,
                [f"The {org} works in {trade}.", f"The trade of the {org} is {trade}."],
                [f"What trade is the {org} in?", f"Which business is the {org} in?"],
            ),
        ]
        entities.append({"id": f"org-{n:03d}", "kind": "org", "name": org, "facts": facts})
    for entity in entities:  # each fact: one of its sentence forms, one of its questions; the order shuffled
        entity["facts"] = [(a, ans, rng.choice(s), rng.choice(q)) for a, ans, s, q in entity["facts"]]
        rng.shuffle(entity["facts"])
    return entities


def write_world(args, out: Path, enc):
    """docs/<entity>.txt, and question records {question, answer, gold} whose gold is the passage that states the
    fact: train.jsonl (training entities), test.jsonl (held-out entities), closed.jsonl (the training questions as
    prompt/completion, for closed-book SFT)."""
    n = args.entities
    entities = make_world(n // 2, n // 4, n - n // 2 - n // 4, args.seed)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    for e in entities:
        atomic_write(out / "docs" / f"{e['id']}.txt", " ".join(sentence for _, _, sentence, _ in e["facts"]) + "\n")
    docs = [(e["id"], (out / "docs" / f"{e['id']}.txt").read_text()) for e in entities]
    passages = split_passages(enc, docs, args.passage_tokens)  # the passages every run and measurement indexes
    by_doc = {}
    for p in passages:
        by_doc.setdefault(p["doc"], []).append(p)
    order = list(range(len(entities)))
    random.Random(args.seed + 1).shuffle(order)
    heldout = set(order[: int(len(order) * 0.3)])  # 30% of the entities are never trained on
    train, test = [], []
    for i, e in enumerate(entities):
        for _, answer, sentence, question in e["facts"]:
            gold = next(p["id"] for p in by_doc[e["id"]] if sentence in p["text"])
            (test if i in heldout else train).append({"question": question, "answer": answer, "gold": [gold]})
    random.Random(args.seed + 2).shuffle(test)
    test = test[: args.test_questions]
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    atomic_write(out / "train.jsonl", lines(train))
    atomic_write(out / "test.jsonl", lines(test))
    atomic_write(out / "closed.jsonl", lines({"prompt": r["question"], "completion": r["answer"]} for r in train))
    return len(entities), len(passages), len(train), len(test)


def write_tasks(args, out: Path, enc):
    """Part 2's data: entity.jsonl (RAFT examples of the training questions written out once: p 0.8, three random
    distractors, each question twice), attribution.jsonl and attribution-test.jsonl (windows of the books: the
    training ones from each book's first 98%, the test ones from its last 2%, which nano never saw)."""
    index = Index.build(enc, out / "docs", args.passage_tokens)
    spec = type("Spec", (), {"p": 0.8, "distractors": 3, "distractor_source": "random"})
    rng, rows = random.Random(args.seed), []
    for q in read_questions(out / "train.jsonl", index) * 2:
        chosen = raft_example(enc, q, index, spec, "plain", 256, rng)[2]  # (the passages that fit 256 tokens)
        content = rag_content(q["question"], [index.passages[n]["text"] for n in chosen])
        rows.append({"prompt": content, "completion": q["answer"]})
    atomic_write(out / "entity.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    train, test = [], []
    for stem, title in BOOKS.items():
        ids = enc.encode_ordinary(read_book(Path(args.corpus) / f"{stem}.txt")) + [enc.eot_token]
        cut = int(len(ids) * 0.98)  # nanotune.pretrain's split: the last 2% held out
        for part, lo, hi, count in ((train, 0, cut, args.windows), (test, cut, len(ids), args.windows // 4)):
            for _ in range(count):
                start = rng.randrange(lo, hi - 48)
                window = " ".join(enc.decode(ids[start : start + 48]).split())
                part.append({"question": f"Which novel is this passage from?\n{window}", "answer": title})
    rng.shuffle(train)
    pairs = ({"prompt": r["question"], "completion": r["answer"]} for r in train)
    atomic_write(out / "attribution.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    atomic_write(out / "attribution-test.jsonl", "".join(json.dumps(r) + "\n" for r in test))


# ---------------------------------------------------------------- the runs and the measurements


def parse_args(argv=None):
    p = Parser(__doc__, prog="python experiments/raft.py")
    add = p.add_argument
    add("--out", default="out/raft-exp", help="folder of the data, the runs and the results (default out/raft-exp)")
    add("--model", default="weights/nano", help="the start model of every run (default weights/nano)")
    add("--quick", action="store_true", help="fewer entities, settings and steps (minutes, not an hour)")
    add("--steps", type=integer(1), help="training steps of part 1's runs (default 100, --quick 40)")
    add("--mix-steps", type=integer(1), help="training steps of part 2's runs (default 30, --quick 20)")
    add("--entities", type=integer(8), help="people, places and organisations, 2:1:1 (default 240, --quick 80)")
    add("--test-questions", type=integer(1), help="held-out questions measured (default 120, --quick 60)")
    tokens = "longest passage (default 24: a fact or two, so that a step costs half what 40-token passages cost)"
    add("--passage-tokens", type=integer(8), default=24, help=tokens)
    limit = "part 2: use only the first N records of the instruction set (default all)"
    add("--instruction-limit", type=integer(20), default=None, help=limit)
    add("--windows", type=integer(4), help="attribution training windows per book (default 40, --quick 12)")
    add("--instruction-data", default=str(SHARED / "instruction-data.json"), help="part 2's instruction set")
    add("--corpus", default=str(SHARED / "corpus"), help="the 15 novels nano was pretrained on (part 2)")
    lr = "learning rate of every run, after 10 warmup steps (default 2e-3: nano learns the task's form in 100 steps)"
    add("--lr", default="2e-3", help=lr)
    add("--device", default="cpu", help="device of every run (default cpu)")
    add("--seed", type=integer(0), default=1337, help="the world's, the split's and every run's seed")
    add("--world-only", action="store_true", help="only write the documents and questions into --out (no runs)")
    args = p.parse_args(argv)
    defaults = {"steps": (100, 40), "mix_steps": (30, 20), "entities": (240, 80), "test_questions": (120, 60)}
    defaults |= {"windows": (40, 12)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def train_commands(args, out: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, output folder, command) of every trained model: part 1's, then part 2's."""
    runs = out / "runs"
    common = ["--model", args.model, "--seed", str(args.seed), "--device", args.device, "--lr", args.lr]
    common += ["--warmup", "10"]
    common += ["--batch-size", "8", "--template", "plain", "--log-every", "10", "--save-every", "0"]
    steps = ["--steps", str(args.steps), "--eval-every", str(args.steps)]
    sft = ["train_sft.py", *common, "--responses", "0"]
    raft = ["train_raft.py", *common, *steps, "--data", str(out / "train.jsonl"), "--docs", str(out / "docs")]
    raft += ["--passage-tokens", str(args.passage_tokens), "--responses", "0"]
    commands = [("SFT closed book", runs / "sft-closed", sft + steps + ["--data", str(out / "closed.jsonl")])]
    for p in (1.0, 0.5) if args.quick else (1.0, 0.8, 0.5, 0.0):
        commands.append((f"RAFT p={p:g}", runs / f"raft-p{p:g}", raft + ["--p", str(p)]))
    tasks = {"entities": out / "entity.jsonl", "attribution": out / "attribution.jsonl"}
    tasks["instructions"] = Path(args.instruction_data)
    data = [str(path) for path in tasks.values()]
    sft += ["--steps", str(args.mix_steps), "--eval-every", str(args.mix_steps)]
    sft += ["--limit", str(args.instruction_limit)] if args.instruction_limit else []
    commands.append(("mixture", runs / "mix", sft + ["--data", *data, "--mix", "1,1,1"]))
    for task, path in tasks.items():
        commands.append((f"{task} alone", runs / f"alone-{task}", sft + ["--data", str(path)]))
    return commands


def measure(argv: list[str]) -> dict:
    """One point: python -m nanotune.qa with these flags, run in this process (the same code as the command)."""
    return {"command": shlex.join(["python", "-m", "nanotune.qa", *argv])} | qa_tool.main(argv)


def part_one(args, out: Path, folders: dict) -> list[dict]:
    """Every model of part 1 at every test-time setting: [{model, setting, exact_match, f1, ..., command}]."""
    test, docs = str(out / "test.jsonl"), str(out / "docs")
    flags = ["--data", test, "--template", "plain", "--max-new-tokens", "16", "--device", args.device]
    flags += ["--passage-tokens", str(args.passage_tokens)]
    settings = [("top-1", ["--passages", "1"]), ("top-3", ["--passages", "3"])]
    settings += [] if args.quick else [("top-5", ["--passages", "5"])]
    settings += [("top-3 + gold", ["--passages", "3", "--gold"])]
    models = [("nano + RAG", args.model)]
    models += [
        (f"{name} + RAG", str(folder)) for name, folder in folders.items() if not name.endswith(("alone", "mixture"))
    ]
    points = []
    if "SFT closed book" in folders:
        closed = ["--model", str(folders["SFT closed book"]), *flags]
        points.append({"model": "SFT closed book", "setting": "no passages"} | measure(closed))
    for model, folder in models:
        for setting, extra in settings:
            points.append(
                {"model": model, "setting": setting} | measure(["--model", folder, *flags, "--docs", docs, *extra])
            )
    return points


def part_two(args, out: Path, folders: dict) -> list[dict]:
    """Each part-2 model on each task: entity exact match (3 passages), attribution accuracy, instruction ppl."""
    rows = []
    for name in ("mixture", "entities alone", "attribution alone", "instructions alone"):
        if name not in folders:
            rows.append({"model": name, "failed": True})
            continue
        folder, row = folders[name], {"model": name}
        flags = ["--model", str(folder), "--template", "plain", "--max-new-tokens", "16", "--device", args.device]
        if name in ("mixture", "entities alone"):
            docs = ["--docs", str(out / "docs"), "--passages", "3", "--passage-tokens", str(args.passage_tokens)]
            entity = measure([*flags, "--data", str(out / "test.jsonl"), *docs])
            row["entities"] = {"exact_match": entity["exact_match"], "command": entity["command"]}
        if name in ("mixture", "attribution alone"):
            books = measure([*flags, "--data", str(out / "attribution-test.jsonl")])
            row["attribution"] = {"accuracy": books["exact_match"], "command": books["command"]}
        if name in ("mixture", "instructions alone"):
            summary = json.loads((folder / "summary.json").read_text())
            ppl = (
                summary["per_source"]["instruction-data"]["val_ppl_after"]
                if name == "mixture"
                else summary["val_ppl_after"]
            )
            row["instructions"] = {"val_ppl": ppl, "command": (folder / "command.txt").read_text()}
        rows.append(row)
    return rows


def report(out: Path, world: tuple, points: list[dict], tasks: list[dict], commands, minutes: float):
    """raft.json (everything), raft.md (the tables, each point beside its command) and raft.svg."""
    atomic_write(out / "raft.json", json.dumps({"points": points, "tasks": tasks}, indent=1) + "\n")
    settings = list(dict.fromkeys(p["setting"] for p in points))
    lines = [
        f"{world[0]} entities, {world[1]} passages, {world[2]} training and {world[3]} held-out questions; "
        f"{minutes:.1f} minutes in all.",
        "",
        "Held-out questions, exact match % / token F1:",
        "",
        "| model | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for model in dict.fromkeys(p["model"] for p in points):
        cells = {p["setting"]: f"{p['exact_match']:.1%} / {p['f1']:.2f}" for p in points if p["model"] == model}
        lines.append(f"| {model} | " + " | ".join(cells.get(s, "") for s in settings) + " |")
    recall = {
        p["setting"]: p["recall_at_k"] for p in points if p["model"] == "nano + RAG" and "gold" not in p["setting"]
    }
    lines += [
        "",
        "Retriever (BM25 over the passages, the held-out questions): "
        + ", ".join(f"recall@{s.removeprefix('top-')} {r:.1%}" for s, r in recall.items())
        + ".",
    ]
    lines += [
        "",
        "Every point and its command (`gold in prompt`: the share of prompts that held the gold passage):",
        "",
    ]
    lines += ["| model | setting | exact match | F1 | gold in prompt | command |", "|---|---|---|---|---|---|"]
    for p in points:
        numbers = f"{p['exact_match']:.1%} | {p['f1']:.3f} | {p['gold_in_prompt']:.1%}"
        lines.append(f"| {p['model']} | {p['setting']} | {numbers} | `{p['command']}` |")
    lines += ["", "Part 2, each task's measure on its held-out data:", ""]
    lines += [
        "| model | entities: exact match | attribution: accuracy | instructions: held-out perplexity |",
        "|---|---|---|---|",
    ]
    for row in tasks:
        cells = [
            f"{row['entities']['exact_match']:.1%}" if "entities" in row else "",
            f"{row['attribution']['accuracy']:.1%}" if "attribution" in row else "",
            f"{row['instructions']['val_ppl']:.1f}" if "instructions" in row else "",
        ]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += ["", "Commands of part 2's points:", ""]
    for row in tasks:
        for task in ("entities", "attribution", "instructions"):
            if task in row:
                lines.append(f"- {row['model']}, {task}: `{row[task]['command']}`")
    failed = [name for name, folder, _ in commands if not (folder / "command.txt").is_file()]
    lines += ["", f"Failed runs (their logs are in logs/): {', '.join(failed)}."] if failed else []
    commands = [c for c in commands if c[0] not in failed]
    lines += ["", "The training commands:", ""] + [
        f"- {name}: `{(folder / 'command.txt').read_text()}`" for name, folder, _ in commands
    ]
    atomic_write(out / "raft.md", "\n".join(lines) + "\n")
    series = {}
    for p in points:
        if p["setting"].startswith("top-") and "gold" not in p["setting"]:
            series.setdefault(p["model"], []).append((float(p["setting"].removeprefix("top-")), 100 * p["exact_match"]))
    title = "held-out exact match against the passages retrieved"
    plot_curves(out / "raft.svg", series, title, "passages in the prompt (BM25 top k)", "exact match (%)")


def main(argv=None):
    args = parse_args(argv)
    out, started = Path(args.out), time.time()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    enc = load_tokenizer()
    world = write_world(args, out, enc)
    print(
        f"world: {world[0]} entities, {world[1]} passages, {world[2]} train / {world[3]} held-out questions", flush=True
    )
    if args.world_only:  # (train_raft.py's data for a check elsewhere, .ci/gpu's say)
        return
    write_tasks(args, out, enc)
    commands, folders = train_commands(args, out), {}
    first = [c for c in commands if not c[0].endswith(("alone", "mixture"))]
    for part, runs in (("part 1", first), ("part 2", commands[len(first) :])):
        for name, folder, command in runs:
            try:  # a run that fails (diverged, say) is a missing row, not the end of the experiment
                run_step(command, folder, out / "logs" / f"{folder.name}.log")
                folders[name] = folder
            except StepFailed as e:
                print(f"warning: {e}", file=sys.stderr, flush=True)
        if part == "part 1":  # measured, and its tables written, before part 2 trains
            points = part_one(args, out, folders)
            report(out, world, points, [], first, (time.time() - started) / 60)
    tasks = part_two(args, out, folders)
    report(out, world, points, tasks, commands, (time.time() - started) / 60)
    print(f"{len(points)} points in {(time.time() - started) / 60:.1f} min: {out}/raft.md and raft.svg", flush=True)


if __name__ == "__main__":
    interruptible(main)
