"""experiments/arith_problems.py and arith_reproduce.py: the generator, the run plan, the results page; toy run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mindgap.evaluation import gap
from shared.grading import extract_prediction

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
SCRIPT = EXPERIMENTS / "arith_reproduce.py"


@pytest.fixture(scope="module")
def arith() -> ModuleType:
    sys.path.insert(0, str(EXPERIMENTS))
    import arith_problems

    return arith_problems


@pytest.fixture(scope="module")
def repro() -> ModuleType:
    sys.path.insert(0, str(EXPERIMENTS))
    import arith_reproduce

    return arith_reproduce


# ------------------------------------------------------------------------------------------ generator

EQUATION = re.compile(r"(\d+)([+\-×÷])(\d+)=(\d+)\.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a // b}


def test_same_seed_same_problems_other_seed_others(arith: ModuleType) -> None:
    d = arith.DIFFICULTIES["hard"]
    assert arith.problems(50, d, 3) == arith.problems(50, d, 3)
    assert {r["question"] for r in arith.problems(50, d, 3)}.isdisjoint(
        {r["question"] for r in arith.problems(50, d, 4)}
    )
    assert arith.retention(20, 1) == arith.retention(20, 1)


@pytest.mark.parametrize("name", ["starter", "easy", "medium", "hard"])
def test_held_out_never_in_training_and_questions_distinct(arith: ModuleType, name: str) -> None:
    train, heldout = arith.split_sets(600, 400, arith.DIFFICULTIES[name], 17, 18)
    train_q = [r["question"] for r in train]
    held_q = [r["question"] for r in heldout]
    assert len(set(train_q)) == 600 and len(set(held_q)) == 400
    assert not set(train_q) & set(held_q)
    with pytest.raises(ValueError, match="differ"):
        arith.split_sets(5, 5, arith.DIFFICULTIES[name], 1, 1)


def test_exclusion_is_honoured_and_a_small_space_runs_dry_loudly(arith: ModuleType) -> None:
    tiny = arith.Difficulty(max_number=4, ops="+", phrasing="plain")  # 24 names × 16 items × 2 starts × 3 operands
    first = arith.problems(1000, tiny, 1)
    rest = arith.problems(500, tiny, 2, exclude=frozenset(r["question"] for r in first))
    assert not {r["question"] for r in first} & {r["question"] for r in rest}
    with pytest.raises(ValueError, match="distinct questions"):
        arith.problems(24 * 16 * 2 * 3 + 1, tiny, 1)


@pytest.mark.parametrize("name", ["starter", "easy", "medium", "hard"])
def test_solutions_are_terse_chains_whose_gold_answer_is_right(arith: ModuleType, name: str) -> None:
    d = arith.DIFFICULTIES[name]
    for row in arith.problems(300, d, 5):
        body, final = row["solution"].split("\n")
        assert re.fullmatch(r"(\d+[+\-×÷]\d+=\d+\.)( \d+[+\-×÷]\d+=\d+\.)*", body), row["solution"]
        assert final == f"#### {row['answer']}"
        eqs = [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(body)]
        assert d.min_steps <= len(eqs) <= d.max_steps and {op for _, op, _, _ in eqs} <= set(d.ops)
        value = row["start"]
        for a, op, b, c in eqs:  # each step starts where the last ended and is computed right
            assert a == value and OPS[op](a, b) == c and c >= 1
            if op == "÷":
                assert a % b == 0
            value = c
        assert str(value) == row["answer"] == extract_prediction(row["solution"])
        # the story states the start value and every operand, in order (a distractor's number may sit between)
        numbers = [int(x) for x in re.findall(r"\d+", row["question"])]
        it = iter(numbers)
        assert all(any(x == want for x in it) for want in [row["start"], *(b for _, _, b, _ in eqs)]), row
        assert "\\boxed" not in row["solution"] and "step" not in row["solution"].lower()


def test_difficulty_knob_moves_numbers_steps_and_phrasing(arith: ModuleType) -> None:
    easy = arith.problems(300, arith.DIFFICULTIES["easy"], 9)
    hard = arith.problems(300, arith.DIFFICULTIES["hard"], 9)
    assert all(len(r["steps"]) == 1 and r["start"] <= 20 for r in easy)
    assert all(s["operand"] <= 20 for r in easy for s in r["steps"])
    assert max(r["start"] for r in hard) > 20 and {len(r["steps"]) for r in hard} == {2, 3}
    starter = arith.problems(300, arith.DIFFICULTIES["starter"], 9)
    assert all(r["start"] <= 10 and [s["op"] for s in r["steps"]] == ["+"] for r in starter)
    # plain phrasing: one template per operation and the fixed question; distractor: one more person
    assert all(r["question"].endswith("have now?") and " has " in r["question"] for r in easy)
    plain_names = [{n for n in arith.NAMES if n in r["question"]} for r in easy]
    hard_names = [{n for n in arith.NAMES if n in r["question"]} for r in hard]
    assert all(len(n) == 1 for n in plain_names) and all(len(n) == 2 for n in hard_names)
    mean_words = [sum(len(r["question"].split()) for r in rows) / len(rows) for rows in (easy, hard)]
    assert mean_words[1] > 1.5 * mean_words[0]


def test_difficulty_rejects_bad_settings(arith: ModuleType) -> None:
    for bad in ({"max_number": 3}, {"min_steps": 2, "max_steps": 1}, {"max_steps": 4}, {"ops": "-÷"}, {"ops": "+%"}):
        with pytest.raises(ValueError):
            arith.Difficulty(**bad)


def test_retention_gold_is_the_largest_of_three_distinct_numbers(arith: ModuleType) -> None:
    rows = arith.retention(200, 3)
    for r in rows:
        nums = [int(x) for x in re.findall(r"\d+", r["question"])]
        assert len(set(nums)) == 3 and r["answer"] == str(max(nums))
    # the largest sits in every position about equally often (no positional shortcut)
    positions = [[int(x) for x in re.findall(r"\d+", r["question"])].index(int(r["answer"])) for r in rows]
    assert all(40 <= positions.count(i) <= 95 for i in range(3))


# ------------------------------------------------------------------------------------------- run plan


def test_runs_are_seed_major_and_named_per_seed(repro: ModuleType) -> None:
    runs = repro.parse_runs("sft-raw,is-rewritten", "0,1")
    assert [r.name for r in runs] == ["sft-raw-s0", "is-rewritten-s0", "sft-raw-s1", "is-rewritten-s1"]
    assert repro.arm_of("is-rewritten-s1") == "is-rewritten"
    with pytest.raises(SystemExit, match="kl-raw"):
        repro.parse_runs("kl-raw", "0")


def test_an_existing_out_refuses_other_settings_but_not_more_seeds(repro: ModuleType, tmp_path: Path) -> None:
    repro.check_settings(repro.parse_args(["--out", str(tmp_path)]))
    repro.check_settings(repro.parse_args(["--out", str(tmp_path), "--seeds", "0,1,2", "--arms", "sft-raw"]))
    with pytest.raises(SystemExit, match="steps"):
        repro.check_settings(repro.parse_args(["--out", str(tmp_path), "--steps", "7"]))


def test_toy_overrides_sizes(repro: ModuleType) -> None:
    args = repro.parse_args(["--out", "x", "--toy", "--heldout-size", "999"])
    assert args.heldout_size == 4 and args.steps == 2 and args.enforce_eager
    full = repro.parse_args(["--out", "x"])
    assert full.heldout_size >= 400 and full.n >= 4 and full.seeds == "0" and full.difficulty == "starter"


def test_data_files_are_disjoint_and_reproducible(repro: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "gsm8k.jsonl"
    src.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"x\n#### {i}"}) + "\n" for i in range(9)))
    args = repro.parse_args(["--out", str(tmp_path / "run"), "--gsm8k", str(src), "--gsm8k-size", "5"])
    paths = repro.write_data(args)
    first = {k: p.read_text() for k, p in paths.items()}
    assert repro.write_data(args) == paths and {k: p.read_text() for k, p in paths.items()} == first
    read = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert [len(read[k]) for k in ("train", "arith_heldout", "retention", "gsm8k_heldout")] == [256, 400, 100, 5]
    assert not {r["question"] for r in read["train"]} & {r["question"] for r in read["arith_heldout"]}
    sets = repro.eval_sets(paths)
    assert [s.name for s in sets] == ["arith_heldout", "retention", "gsm8k_heldout"]
    assert sets[0].problems[0].solution == read["arith_heldout"][0]["solution"]
    assert sets[2].problems[0].answer is not None


# ------------------------------------------------------------------------------------------ the page


def _scores(values: list[float]) -> dict[str, Any]:
    return {"ids": [f"p{i}" for i in range(len(values))], "qwen": values, "math_verify": values}


def _arm(name: str, seed: int, held: list[float], ret: list[float], kl: float) -> dict[str, Any]:
    loss, data = name.split("-")
    return {
        "name": f"{name}-s{seed}",
        "arm": name,
        "loss": loss,
        "data": data,
        "seed": seed,
        "report": {},
        "scores": {"arith_heldout": _scores(held), "retention": _scores(ret)},
        "shift": {"arith_heldout": {"kl_from_base": kl, "reference_nll": 1.0}},
        "training": {"steps": 2, "final_loss": 0.5, "final_nll": 0.7, "grad_norm_mean": 1.0, "grad_norm_var": 0.25},
        "seconds": {"train": 10.0, "eval": 5.0},
    }


def _fake_gap() -> dict[str, Any]:
    seqs = [gap.Scored("expert", [-1.0, -2.0], None), gap.Scored("expert", [-0.5], None)]
    return gap.gap_report("m", [gap.dataset_report("raw", Path("raw.jsonl"), "records", seqs)], rescored=True)


def test_summary_has_cis_paired_differences_and_seed_means(repro: ModuleType) -> None:
    base = {"scores": {"arith_heldout": _scores([0.5] * 8), "retention": _scores([1.0] * 8)}, "shift": {}}
    runs = [
        _arm("sft-raw", 0, [0.25] * 8, [0.5] * 8, 0.2),
        _arm("sft-rewritten", 0, [0.5, 1.0] * 4, [1.0] * 8, 0.1),
        _arm("sft-rewritten", 1, [0.5, 0.0] * 4, [1.0] * 8, 0.3) | {"order": "shuffled:1"},
    ]
    summary = repro.summarise(base, runs, ["arith_heldout", "retention"])
    acc = summary["accuracy"]
    assert acc["sft-raw"]["arith_heldout"]["avg"] == pytest.approx(
        {"value": 0.25, "low": 0.25, "high": 0.25, "level": 0.95}
    )
    assert acc["sft-rewritten"]["arith_heldout"]["per_seed"] == [0.75, 0.25]
    # seed 0 has no recorded order: it was trained before the trainer shuffled, in file order
    assert acc["sft-rewritten"]["arith_heldout"]["seeds"] == [
        {"seed": 0, "order": "file"},
        {"seed": 1, "order": "shuffled:1"},
    ]
    assert acc["base"]["arith_heldout"]["seeds"] == []
    # seed by seed: only the seeds both arms have (sft-raw has no seed 1)
    (seeded,) = [d for d in summary["differences_per_seed"] if d["set"] == "arith_heldout"]
    assert (seeded["left"], seeded["right"], seeded["seed"]) == ("sft-rewritten", "sft-raw", 0)
    assert seeded["value"] == pytest.approx(0.5)
    assert acc["sft-rewritten"]["arith_heldout"]["avg"]["value"] == pytest.approx(0.5)  # seeds averaged per problem
    diffs = {(d["left"], d["right"], d["set"]): d for d in summary["differences"]}
    dr = diffs[("sft-rewritten", "sft-raw", "arith_heldout")]
    assert dr["value"] == dr["low"] == dr["high"] == pytest.approx(0.25)  # constant per-problem gap: zero width
    assert diffs[("sft-raw", "base", "retention")]["value"] == pytest.approx(-0.5)
    assert summary["shift"]["sft-rewritten"]["arith_heldout"]["kl_from_base"] == pytest.approx(0.2)


def test_report_writes_page_json_and_plots_from_arm_files(
    repro: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = repro.parse_args(["--out", str(tmp_path), "--report"])
    args.out = tmp_path
    (tmp_path / "arms").mkdir()
    held = {"arith_heldout": _scores([0.0, 0.5, 1.0, 0.25]), "retention": _scores([1.0, 1.0, 0.75, 0.5])}
    shift0 = {"arith_heldout": {"kl_from_base": 0.0, "reference_nll": 2.0}}
    base = {"name": "base", "report": {}, "scores": held, "shift": shift0, "gap": _fake_gap()}
    (tmp_path / "arms" / "base.json").write_text(json.dumps(base))
    for name, seed, held in (
        ("dft-raw", 0, [0.25, 0.5, 1.0, 0.5]),
        ("dft-rewritten", 0, [0.25, 0.5, 1.0, 0.5]),
        ("is-rewritten", 0, [0.25, 0.5, 1.0, 0.5]),
        ("dft-raw", 1, [0.0, 0.25, 0.75, 0.25]),
        ("dft-rewritten", 1, [0.25, 0.5, 1.0, 0.5]),
    ):
        arm = _arm(name, seed, held, [1.0, 0.75, 0.75, 0.5], 0.05) | {"order": f"shuffled:{seed}"}
        (tmp_path / "arms" / f"{name}-s{seed}.json").write_text(json.dumps(arm))
        metrics = tmp_path / "train" / f"{name}-s{seed}" / "metrics.jsonl"
        metrics.parent.mkdir(parents=True)
        rows = [{"step": s, "loss": 1.0 / s, "grad_norm": 2.0, "is_ess": 0.9, "is_weight_max": 1.5} for s in (1, 2)]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"stages": {"self": {"problems": 3, "percent_problems": 30.0}}, "guidance_rejected": {"echo": 2}}
    (tmp_path / "rewritten.jsonl.summary.json").write_text(json.dumps(summary | {"truncated_rejected": 4}))
    repro.write_report(args, repro.Recorder(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "| base | 43.8 [" in md and "| dft-rewritten − dft-raw | +12.5 [+12.5, +12.5] |" in md
    # seed by seed: no difference with seed 0, 25 points with seed 1
    assert "| dft-rewritten − dft-raw | 0 | +0.0 [+0.0, +0.0] |" in md
    assert "| dft-rewritten − dft-raw | 1 | +25.0 [+25.0, +25.0] |" in md
    assert "| is-rewritten − dft-rewritten |" in md and "| dft-raw − base |" in md
    assert "| self | 3 | 30.0 |" in md and "truncated_rejected 4" in md and "guidance: echo 2" in md
    assert "Commands, one per invocation" in md and "Machine: " in md and "mean NLL" in md
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs"] == ["dft-raw-s0", "dft-raw-s1", "dft-rewritten-s0", "dft-rewritten-s1", "is-rewritten-s0"]
    assert "| 56.2 (seed 0, shuffled:0), 56.2 (seed 1, shuffled:1) |" in md
    # rebuilding the page keeps the commands that made the run (here a page that recorded one), not the rebuild's
    (tmp_path / "results.json").write_text(json.dumps(results | {"command": "the run's command"}))
    repro.write_report(args, repro.Recorder(tmp_path))
    assert "- `the run's command`" in (tmp_path / "results.md").read_text()
    # an invocation that resumes the run with another seed is added after it, once
    args.report = False
    monkeypatch.setattr(sys, "argv", ["arith_reproduce.py", "--seeds", "0,1"])
    first, second = repro.run_commands(args)
    assert first == "the run's command" and second.endswith("experiments/arith_reproduce.py --seeds 0,1")
    for png in ("accuracy.png", "training.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_answer_shapes_tell_worked_out_from_graded(repro: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "eval" / "samples").mkdir(parents=True)
    problem = {"id": "s1-0", "question": "Ava has 4 cars. Then Ava gets 2 more cars. How many?", "answer": "6"}
    (tmp_path / "data" / "arith_heldout.jsonl").write_text(json.dumps(problem | {"solution": "4+2=6.\n#### 6"}))
    samples = [  # the eval numbers problems from 1; a sample that works 6 out but ends on 8 is graded wrong
        ("4+2=6.\n#### 6", True, "stop", 6),
        ("4 + 2 = 6 cars. Then 6 + 2 = 8. The answer is 8.", False, "stop", 20),
        ("Ava has many cars and", False, "length", 40),
        ("The answer is 6.", True, "stop", 5),
    ]
    rows = [
        {"benchmark": "arith_heldout", "problem_id": "1", "gold": "6", "response": text, "finish_reason": finish,
         "tokens": tokens, "correct": {"qwen": ok, "math_verify": ok}}
        for text, ok, finish, tokens in samples
    ]  # fmt: skip
    rows.append(rows[0] | {"benchmark": "retention"})  # other sets are left out
    (tmp_path / "eval" / "samples" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shapes = repro.answer_shapes(tmp_path, ["m", "missing"])
    assert shapes == {"m": {"correct": 0.5, "worked_out": 0.5, "terse": 0.25, "truncated": 0.25, "mean_tokens": 17.75}}
    assert repro.answer_shapes(tmp_path / "nothing", ["m"]) == {}


def test_scores_from_samples_keep_problem_order_per_set(repro: ModuleType, tmp_path: Path) -> None:
    rows = [
        {"benchmark": "a", "problem_id": "p2", "correct": {"qwen": True, "math_verify": False}},
        {"benchmark": "a", "problem_id": "p2", "correct": {"qwen": False, "math_verify": False}},
        {"benchmark": "a", "problem_id": "p1", "correct": {"qwen": True, "math_verify": True}},
        {"benchmark": "a", "problem_id": "p1", "correct": {"qwen": True, "math_verify": True}},
        {"benchmark": "b", "problem_id": "p1", "correct": {"qwen": False, "math_verify": False}},
        {"benchmark": "b", "problem_id": "p1", "correct": {"qwen": False, "math_verify": True}},
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = repro.scores_from_samples(path)
    assert scores["a"] == {"ids": ["p2", "p1"], "qwen": [0.5, 1.0], "math_verify": [0.0, 1.0]}
    assert scores["b"] == {"ids": ["p1"], "qwen": [0.0], "math_verify": [0.5]}


def test_probe_shift_is_kl_on_samples_and_nll_on_references(repro: ModuleType) -> None:
    probe = [{"set": "a", "kind": "sample"}, {"set": "a", "kind": "reference"}, {"set": "b", "kind": "sample"}]
    base = [[-1.0, -1.0], [-3.0], [-0.5]]
    model = [[-1.5, -1.0], [-1.0], [-0.5]]
    shift = repro.probe_shift(probe, base, model)
    assert shift["a"] == {"kl_from_base": pytest.approx(0.25), "reference_nll": pytest.approx(1.0)}
    assert shift["b"] == {"kl_from_base": 0.0}


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(2400)
def test_arith_reproduction_runs_and_resumes_arm_by_arm(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "arith"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "MINDGAP_DATA_DIR": str(data_dir)}
    base_cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--toy", "--model", str(tiny_model_dir)]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base_cmd, *extra], env=env, capture_output=True, text=True, timeout=1100)

    first = run("--seeds", "0")
    assert first.returncode == 0, first.stderr[-4000:]
    arms = {"sft-raw", "dft-raw", "sft-rewritten", "dft-rewritten", "is-rewritten"}
    assert {p.stem for p in (out / "arms").glob("*.json")} == {"base"} | {f"{a}-s0" for a in arms}
    base = json.loads((out / "arms" / "base.json").read_text())
    assert [d["name"] for d in base["gap"]["datasets"]] == ["raw", "rewritten"]
    assert {s: len(v["ids"]) for s, v in base["scores"].items()} == {
        "arith_heldout": 4,
        "retention": 2,
        "gsm8k_heldout": 2,
    }
    arm = json.loads((out / "arms" / "is-rewritten-s0.json").read_text())
    assert arm["training"]["steps"] == 2 and math.isfinite(arm["shift"]["arith_heldout"]["kl_from_base"])
    assert not (out / "train" / "is-rewritten-s0" / "checkpoints").exists()  # weights dropped after evaluation
    commands = (out / "commands.txt").read_text().splitlines()
    assert sum(c.startswith("mindgap rewrite") for c in commands) == 1
    is_train = [c for c in commands if c.startswith("mindgap train") and "--loss is" in c]
    assert len(is_train) == 1 and "--is-level token" in is_train[0]
    base_mtime = (out / "arms" / "base.json").stat().st_mtime

    again = run("--seeds", "0,1", "--arms", "dft-rewritten")  # resumes: one new fine-tune, nothing else redone
    assert again.returncode == 0, again.stderr[-4000:]
    commands = (out / "commands.txt").read_text().splitlines()
    assert sum(c.startswith("mindgap rewrite") for c in commands) == 1
    assert sum(c.startswith("mindgap train") for c in commands) == 6
    assert (out / "arms" / "base.json").stat().st_mtime == base_mtime
    md = (out / "results.md").read_text()
    assert "| dft-rewritten − dft-raw |" in md and "| sft-rewritten − sft-raw |" in md
    assert json.loads((out / "results.json").read_text())["runs"] == [
        "sft-raw-s0", "dft-raw-s0", "sft-rewritten-s0", "dft-rewritten-s0", "dft-rewritten-s1", "is-rewritten-s0"
    ]  # fmt: skip
    for png in ("accuracy.png", "training.png", "gap/gap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    refused = run("--difficulty", "easy")
    assert refused.returncode != 0 and "other settings" in refused.stderr


def test_default_data_dir_is_the_shared_folder_beside_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    from mindgap.evaluation.benchmarks import DATA_DIR_ENV, data_dir

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert data_dir() == ROOT.parent / "shared" / "data"  # where write_data finds GSM8K without --gsm8k
