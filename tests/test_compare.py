"""nanotune.compare: the table and the figure of several RL runs, read from their folders."""

import json

import pytest

from nanotune.compare import main


def write_run(folder, script, evals, step_times, peak=None, **args):
    folder.mkdir()
    lines = [{"step": step, "val_score": score, "val_kl": kl} for step, kl, score in evals]
    lines += [{"step": s, "score": 0.0, **times} for s, times in step_times]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    summary = {"status": "finished", "script": script, "args": args, "elapsed_s": 600.0, "peak_memory_mib": peak}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_table_and_ratios_give_the_last_evaluation_median_step_time_and_peak_memory(tmp_path, capsys):
    ppo, grpo = tmp_path / "ppo", tmp_path / "grpo"
    times = [
        (1, {"time_generate_s": 1.0, "time_score_s": 2.0, "time_update_s": 3.0}),
        (10, {"time_generate_s": 2.0, "time_score_s": 2.0, "time_update_s": 4.0}),
        (20, {"time_generate_s": 9.0, "time_score_s": 9.0, "time_update_s": 9.0}),
    ]
    write_run(ppo, "train_ppo.py", [(0, 0.0, 0.1), (10, 2.5, 0.4), (20, 4.25, 0.7)], times, peak=2000.0)
    grpo_args = dict(advantage="rloo", loss_agg="token", beta=0.04)
    write_run(grpo, "train_grpo.py", [(0, 0.0, 0.1), (20, 30.0, 0.9)], times[:2], peak=1500.0, **grpo_args)
    main([str(ppo), str(grpo), "--svg", str(tmp_path / "kl.svg")])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ")[1:] for line in out if line.startswith(("| ppo", "| grpo"))]
    assert rows[0] == ["PPO", "20", "0.700", "4.2", "8.0", "2000", "10.0 |"]  # median of 6, 8 and 27 s
    assert rows[1] == ["GRPO (rloo, token, beta 0.04)", "20", "0.900", "30.0", "7.0", "1500", "10.0 |"]
    assert out[-2] == "grpo against ppo: step time 0.88x, peak memory 0.75x"
    svg = (tmp_path / "kl.svg").read_text()
    assert svg.count("<polyline") == 2 and ">ppo</text>" in svg and ">grpo</text>" in svg
    assert svg.count("<circle") == 3 + 2  # each evaluation marked
    main([str(ppo), str(grpo), "--svg", str(tmp_path / "near.svg"), "--max-kl", "5"])
    near = (tmp_path / "near.svg").read_text()
    assert near.count("<circle") == 3 + 1 and "KL &lt;= 5 drawn" in near  # grpo's point at KL 30 left out


def test_a_folder_without_evaluations_is_a_clear_error(tmp_path, capsys):
    write_run(tmp_path / "run", "train_ppo.py", [], [(1, {"time_update_s": 1.0})])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run")])
    assert "no held-out evaluation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_run_killed_mid_write_is_read_without_its_cut_off_line(tmp_path, capsys):
    write_run(tmp_path / "run", "train_ppo.py", [(0, 0.0, 0.1), (10, 2.5, 0.4)], [(1, {"time_update_s": 1.0})])
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 11, "val_sc')  # the line a kill -9 cut
    main([str(tmp_path / "run"), "--svg", str(tmp_path / "kl.svg")])
    captured = capsys.readouterr()
    assert "the last line was cut off" in captured.err and "Traceback" not in captured.err
    rows = [line.split(" | ") for line in captured.out.splitlines() if line.startswith("| run ")]
    assert rows[-1][3] == "0.400"  # the last whole evaluation's score (the header row comes first)
    metrics.write_text('{"step": 1\n' + metrics.read_text())  # a bad line in the middle: no run wrote that
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run")])
    assert f"{metrics}: line 1 is not valid JSON" in capsys.readouterr().err


def test_runs_that_share_a_folder_name_are_named_by_their_paths(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_run(a / "ppo", "train_ppo.py", [(0, 0.0, 0.1), (10, 1.0, 0.3)], [(1, {"time_update_s": 1.0})])
    write_run(b / "ppo", "train_ppo.py", [(0, 0.0, 0.1), (10, 2.0, 0.6)], [(1, {"time_update_s": 2.0})])
    svg = tmp_path / "new" / "folder" / "kl.svg"  # a figure's folder that does not exist yet is made
    main([str(a / "ppo"), str(b / "ppo"), "--svg", str(svg)])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| /")]
    assert [(r[0], r[3]) for r in rows] == [(f"| {a / 'ppo'}", "0.300"), (f"| {b / 'ppo'}", "0.600")]  # both kept
    assert svg.is_file()
    with pytest.raises(SystemExit):
        main([str(a / "ppo"), str(a / "ppo")])
    assert "a run is named twice" in capsys.readouterr().err
