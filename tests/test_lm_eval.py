"""lm-evaluation-harness as a real client: the same small tasks (multiple choice, and generate_until), written
here and read from local files offline, run against the server (local-completions, tokenized requests, as lm-eval
sends them by default) and against the model folder itself (--model hf, transformers). Both must give the same
per-item log-likelihoods and accuracies, and those must be nanotune's own teacher-forced scoring."""

import json
import os
import random

import pytest
import torch
from helpers import QUICK_REQUESTS, serving

from nanotune.data.instruct import token_logprobs
from nanotune.generate import generate
from nanotune.lifecycle.folder import write_model_files
from nanotune.model.gpt import GPT
from nanotune.tokenizer import load_tokenizer

try:
    import lm_eval  # noqa: F401
except ImportError:  # (the test extra installs it: under CI=true its absence is a failure, not a skip)
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("lm_eval is not installed: pip install -e '.[test]'", allow_module_level=True)
WORDS = "king queen river sea ship island giant little horse man woman town gold silver tree hill".split()
CONTEXT = 256


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    """The tiny model as a whole model folder: weights, config, and the tokenizer that lm-eval's hf path needs."""
    path = tmp_path_factory.mktemp("lm-eval-model")
    GPT.from_pretrained(tiny).save_pretrained(path)
    write_model_files(path, CONTEXT, None)
    return path


@pytest.fixture(scope="module")
def tasks(folder, tmp_path_factory):
    """Two tasks in an include folder: 48 four-way questions, and 40 prompts to continue until a newline, half
    of whose targets are nanotune's own greedy continuation (so exact match is about half, not 0 or 1)."""
    model, enc = GPT.from_pretrained(folder).eval(), load_tokenizer()
    rng = random.Random(0)
    here = tmp_path_factory.mktemp("lm-eval-tasks")
    questions = []
    for i in range(48):
        words = rng.sample(WORDS, 6)
        questions.append(
            {
                "question": f"Q{i}: which is the {words[0]} of the {words[1]}?",
                "choices": words[2:],
                "answer": rng.randrange(4),
            }
        )
    prompts = [f"The {rng.choice(WORDS)} and the {rng.choice(WORDS)} went to" for _ in range(40)]
    generations = []
    for i, prompt in enumerate(prompts):
        ids = enc.encode_ordinary(prompt)
        own = enc.decode(generate(model, [ids], 8, temperature=0)[0][len(ids) :]).split("\n")[0]
        generations.append({"prompt": prompt, "target": own if i % 2 == 0 else own + " not this"})
    for name, rows in (("mc", questions), ("gen", generations)):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{file}}\n  cache_dir: {here / 'cache'}\n"
    common += "test_split: test\n"
    (here / "mc.yaml").write_text(
        "task: nanotune_mc\n" + common.format(file=here / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (here / "gen.yaml").write_text(
        "task: nanotune_gen\n" + common.format(file=here / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return here, questions, generations


def evaluate(model: str, model_args: dict, include: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=False)  # (not the thousands of built-in tasks)
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["nanotune_mc", "nanotune_gen"],
        task_manager=manager,
        log_samples=True,
        batch_size=8,
        device="cpu",
    )


def own_logliks(folder, questions) -> list[list[float]]:
    """nanotune's teacher-forced log p(choice | question) for every choice, the pair tokenized as lm-eval does
    (the whole text encoded, the context's tokens split off)."""
    model, enc = GPT.from_pretrained(folder).eval(), load_tokenizer()
    out = []
    for q in questions:
        context = f"{q['question']}\nA:"
        scores = []
        for choice in q["choices"]:
            whole, head = enc.encode_ordinary(context + " " + choice), enc.encode_ordinary(context)
            x = torch.tensor([whole])
            with torch.no_grad():
                lp = token_logprobs(model(x)[:, :-1], x[:, 1:])[0, len(head) - 1 :]
            scores.append(float(lp.sum()))
        out.append(scores)
    return out


def per_item(results: dict) -> tuple[list[list[float]], list[str]]:
    """-> each question's choice log-likelihoods, and each generate_until prompt's answer, in document order."""
    mc = sorted(results["samples"]["nanotune_mc"], key=lambda s: s["doc_id"])
    gen = sorted(results["samples"]["nanotune_gen"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in mc], [s["filtered_resps"][0] for s in gen]


def test_lm_eval_through_the_server_and_on_the_folder_agree_with_nanotunes_own_scoring(folder, tasks, tmp_path):
    include, questions, generations = tasks
    with serving(folder, tmp_path / "server.log", "--name", "tiny", "--max-tokens", "16", env=QUICK_REQUESTS) as url:
        served = evaluate(
            "local-completions",
            {
                "model": "tiny",
                "base_url": f"{url}/v1/completions",
                "tokenizer": str(folder),
                "tokenizer_backend": "huggingface",
                "max_length": CONTEXT,
                "tokenized_requests": True,
            },
            str(include),
        )
    hf = evaluate("hf", {"pretrained": str(folder), "max_length": CONTEXT, "dtype": "float32"}, str(include))
    own = own_logliks(folder, questions)
    own_acc = sum(max(range(4), key=s.__getitem__) == q["answer"] for s, q in zip(own, questions)) / len(questions)
    report = {}
    for name, results in (("server", served), ("hf", hf)):
        logliks, answers = per_item(results)
        report[name] = {
            "acc": results["results"]["nanotune_mc"]["acc,none"],
            "max |loglik - nanotune's|": max(abs(a - b) for x, y in zip(logliks, own) for a, b in zip(x, y)),
            "exact_match": results["results"]["nanotune_gen"]["exact_match,none"],
        }
        assert report[name]["max |loglik - nanotune's|"] < 1e-4, (name, report)
        assert report[name]["acc"] == own_acc
        # generate_until: nanotune's own greedy continuation, so the even items match and the odd ones do not
        assert [a == g["target"] for a, g in zip(answers, generations)] == [i % 2 == 0 for i in range(40)], name
    print(f"lm-eval on {len(questions)} questions, nanotune's own accuracy {own_acc:.4f}: {report}")
    assert 0.1 < own_acc < 0.9  # (neither all right nor all wrong: the comparison says something)
    assert report["server"]["exact_match"] == report["hf"]["exact_match"] == 0.5
    served_ll, hf_ll = per_item(served)[0], per_item(hf)[0]
    assert max(abs(a - b) for x, y in zip(served_ll, hf_ll) for a, b in zip(x, y)) < 1e-4
