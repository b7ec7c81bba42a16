"""The repository's own promises: CI runs the README's test command, scripts start
from any folder, --quick runs stay in out/quick/, the verification-list plugin ticks and
crosses items."""
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.verification import REPO_ROOT

pytest_plugins = ["pytester"]

SCRIPTS = sorted(p for p in REPO_ROOT.glob("step[0-9]*_*/*.py") if p.name != "__init__.py"
                 and "def main(" in p.read_text(encoding="utf-8"))


def readme_test_command() -> str:
    """The second command of the README's quick start."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if "pytest" in line]
    assert commands, "README.md has no test command in a code block"
    return commands[0]


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert readme_test_command() in ci.splitlines()
    assert ci.index("torch==2.13.0") < ci.index(readme_test_command())


def heading_anchors(document) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", document.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_markdown_link_points_to_a_file_in_the_repository():
    """Relative links in the READMEs resolve, #anchors to a heading of the file; links into out/ name what a
    step's script writes, not a file here."""
    found = [*REPO_ROOT.glob("*.md"), *REPO_ROOT.glob("*/*.md"), *REPO_ROOT.glob("common/*/*.md")]
    top = lambda d: d.relative_to(REPO_ROOT).parts[0]  # noqa: E731
    documents = [d for d in found if top(d) != "out" and not top(d).startswith(".")]  # not written by runs or tools
    checked, broken = 0, []
    for document in documents:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", document.read_text(encoding="utf-8")):
            path = (document.parent / target).resolve() if target else document
            if target.startswith(("http://", "https://")) or REPO_ROOT / "out" in path.parents:
                continue
            checked += 1
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in heading_anchors(path)):
                broken.append(f"{document.relative_to(REPO_ROOT)} -> {target}#{anchor}")
    assert checked >= 10 and not broken, broken


def test_every_script_starts_from_its_own_folder_and_as_a_module():
    """--help from inside the script's folder (sys.path lacks the repo root there), and one `python -m`."""
    def run(args, cwd):
        return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)

    jobs = [([script.name, "--help"], script.parent) for script in SCRIPTS]
    jobs.append((["-m", "step1_tokenizer.train_tokenizer", "--help"], REPO_ROOT))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: run(*job), jobs))
    failed = [f"{' '.join(args)} in {cwd.name}: {r.stderr.strip().splitlines()[-1:]}"
              for (args, cwd), r in zip(jobs, results) if r.returncode != 0 or "usage" not in r.stdout]
    assert len(SCRIPTS) >= 5
    assert not failed, failed


def test_quick_runs_read_and_write_out_quick_and_leave_a_full_run_alone(tmp_path, monkeypatch, capsys):
    import common.paths
    import run_all
    from common.cli import UserError
    from step1_tokenizer import show_tokens, train_tokenizer
    from step3_pretrain import train_pretrain

    out = tmp_path / "out"
    monkeypatch.setattr(common.paths, "OUT_DIR", out)
    (out / "step1").mkdir(parents=True)
    full_run = {out / "tokenizer.json": b"a full run's tokenizer", out / "step1" / "metrics.json": b"{}"}
    for path, content in full_run.items():
        path.write_bytes(content)
    train_tokenizer.main(["--quick"])
    assert common.paths.OUT_DIR == out / "quick"
    assert (out / "quick" / "tokenizer.json").exists() and (out / "quick" / "step1" / "metrics.json").exists()
    assert all(path.read_bytes() == content for path, content in full_run.items())
    assert sorted(p.name for p in out.iterdir()) == ["quick", "step1", "tokenizer.json"]
    printed = capsys.readouterr().out  # the next command keeps --quick
    assert "next: python step1_tokenizer/show_tokens.py --quick" in printed
    # each script's own --quick must switch: start every call from the full run's out/ again
    monkeypatch.setattr(common.paths, "OUT_DIR", out)
    show_tokens.main(["--quick", "hello"])  # reads the quick run's tokenizer, not the full run's
    assert f"tokenizer: {out / 'quick' / 'tokenizer.json'}" in capsys.readouterr().out
    monkeypatch.setattr(common.paths, "OUT_DIR", out)
    with pytest.raises(UserError, match=r"no tokenized data; run python step3_pretrain/data.py --quick$") as err:
        train_pretrain.main(["--quick"])
    assert str(out / "quick" / "step3" / "meta.json") in str(err.value)
    monkeypatch.setattr(common.paths, "OUT_DIR", out)
    assert run_all.main(["--quick", "--from", "99"]) == 0  # no step runs; the report card goes to out/quick/
    assert "Profile: quick." in (out / "quick" / "report.md").read_text() and not (out / "report.md").exists()


def test_report_card_shows_exact_shares_to_four_digits_and_large_numbers_whole():
    import run_all

    assert run_all.shown(296 / 356) == "0.8315" and run_all.shown(0.2327) == "0.2327"
    assert run_all.shown(512345.6) == "512,346" and run_all.shown(488.31) == "488.3"
    assert run_all.shown(3590656) == "3590656" and run_all.shown(None) == "None"
    assert run_all.shown(float("nan")) == "nan"
    assert run_all.figure(296 / 356, "share") == "83.1 %" and run_all.figure(131392, "") == "131,392"
    assert run_all.figure(488.31, "s") == "488.3 s" and run_all.figure(True, "") == "yes"


def test_report_card_gives_headlines_with_units_plots_inline_and_links_the_raw_figures(tmp_path, monkeypatch):
    """A fake out/: step 1 and 5 wrote figures (step 5 only some of its keys), step 3 a plot too, step 2 nothing."""
    import json

    import common.paths
    import run_all

    out = tmp_path / "out"
    monkeypatch.setattr(common.paths, "OUT_DIR", out)
    monkeypatch.setattr(run_all, "STEPS", [(1, "Tokenizer", []), (2, "The model", []), (3, "Pretraining", []),
                                           (5, "Retrieval", []), (6, "Multimodal", [])])
    monkeypatch.setattr(run_all, "machine", lambda: "Some CPU, 2 cores, Linux, Python 3.11.7")
    figures = {1: {"vocab_size": 2497, "bytes_per_token": 3.4567, "kv": {"deep": [1, 2]}},
               3: {"params": 131392, "val_loss": 4.955, "probe": {"facts": 0.5, "sums": 0.9633}},
               5: {"retrieval_recall": 0.875, "qa_em_closed_book": 0.1},
               6: {"vqa_acc": {"overall": 0.25, "colour": 0.5}}}
    for step, metrics in figures.items():
        (out / f"step{step}").mkdir(parents=True)
        (out / f"step{step}" / "metrics.json").write_text(json.dumps(metrics))
    (out / "step3" / "loss_curve.png").write_bytes(b"png")
    report = run_all.write_report({1: 3.4, 3: 61.2}, quick=False).read_text()
    assert report.splitlines()[:6] == ["# Report card", "", "Profile: default. Machine: Some CPU, 2 cores, Linux, "
                                       "Python 3.11.7.", "", "Wall time of this run: 65 s.", ""]
    assert report.split("## Step 1: Tokenizer\n\n")[1].split("\n## ")[0] == (
        "Wall time: 3 s. All figures: [step1/metrics.json](step1/metrics.json).\n\n"
        "| figure | value | what it says |\n|---|---|---|\n"
        "| vocabulary | 2,497 token ids | the 256 bytes, the merges learned and the special tokens |\n"
        "| compression | 3.457 bytes/token | UTF-8 bytes of held-out text per token: more is better |\n")
    assert "## Step 2: The model\n\nnot run\n" in report
    assert "| parameters | 131,392 | the model pretrained here |\n" in report
    assert "| validation loss | 4.955 nats/token |" in report and "| world facts completed | 50.0 % |" in report
    assert "| sums completed | 96.3 % |" in report and "\n![loss_curve](step3/loss_curve.png)\n" in report
    assert "Wall time: not timed (run before this run_all.py). All figures: [step5/metrics.json]" in report
    assert "| retrieval recall | 87.5 % |" in report and "| answers without the database | 10.0 % |" in report
    assert "edited" not in report and "kv" not in report  # missing keys left out; the raw figures only linked
    assert "| image questions answered | 25.0 % |" in report and "colour" not in report


def test_plugin_prints_each_step_list_ticked_and_crossed(pytester):
    pytester.makeconftest("pytest_plugins = ['tests.conftest']")
    pytester.makepyfile('''
        import pytest

        @pytest.mark.verifies(99, "alpha holds")
        def test_alpha():
            assert True

        @pytest.mark.verifies(99, "beta holds")
        def test_beta():
            assert False
    ''')
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "Step 99  1/2" in out
    assert re.search(r"(✓|\+) alpha holds", out) and re.search(r"(✗|x) beta holds", out)


def test_threads_one_for_a_quick_run_pytorchs_choice_for_a_default_run_and_threads_n_decides(monkeypatch):
    """A tiny model on several threads waits on itself and, beside another busy process, fights it for the
    cores (common/device.py): --quick sets one thread, a default run PyTorch's own choice, --threads N wins."""
    import torch

    import common.device
    from step2_model import causality_check

    monkeypatch.setattr(common.device, "threads_asked", None)
    monkeypatch.setattr(common.device, "TORCH_THREADS", 3)  # as if PyTorch had picked three at start-up
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        causality_check.main(["--quick"])
        assert torch.get_num_threads() == 1
        causality_check.main(["--quick", "--threads", "2"])
        assert torch.get_num_threads() == 2 and common.device.threads_asked == 2
        monkeypatch.setattr(common.device, "threads_asked", None)
        monkeypatch.setattr(common.paths, "OUT_DIR", common.paths.OUT_DIR.parent)  # out of out/quick/ again
        causality_check.main(["--tokens", "4"])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_next_hints_name_the_script_as_the_learners_folder_reaches_it(tmp_path, monkeypatch, capsys):
    """Inside step1_tokenizer/ the hint says `python show_tokens.py`, and that command runs there."""
    from common.cli import next_command
    from step1_tokenizer import train_tokenizer

    monkeypatch.chdir(REPO_ROOT / "step1_tokenizer")
    assert next_command("python step4_sft/chat.py --lora a.pt") == "python ../step4_sft/chat.py --lora a.pt"
    train_tokenizer.main(["--quick", "--out", str(tmp_path / "tokenizer.json")])
    hint = capsys.readouterr().out.split("next: ")[1].strip()
    assert hint == f"python show_tokens.py --tokenizer {tmp_path / 'tokenizer.json'} --quick"
    shown = subprocess.run([sys.executable, *hint.split()[1:], "hello"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "for 5 bytes" in shown.stdout, shown.stderr  # "hello": 5 bytes
    monkeypatch.chdir(REPO_ROOT)
    assert next_command("python step4_sft/chat.py") == "python step4_sft/chat.py --quick"  # still a quick run
    monkeypatch.chdir(tmp_path)  # outside the repository: the whole path
    assert next_command("python run_all.py --from 3") == f"python {REPO_ROOT / 'run_all.py'} --from 3 --quick"


def test_quick_runs_say_they_are_smoke_tests_and_what_a_model_that_chats_costs(tmp_path, monkeypatch):
    """The README's quick start, the quick report card's first line and chat's banner (tests/test_step4_sft.py)
    say it; the minutes are steps 3 and 4 of the README's Results table."""
    import common.paths
    import run_all
    from common.cli import QUICK_MODEL_NOTE

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    pretrain = int(re.search(r"^\| 3 \| pretraining .*?\| (\d+) s of training", readme, re.M).group(1))
    sft = int(re.search(r"^\| 4 \| held-out accuracy, .*?full SFT \((\d+) s\)", readme, re.M).group(1))
    minutes = round((pretrain + sft) / 60)
    assert f"about {minutes} minutes of training on a 2-core CPU" in QUICK_MODEL_NOTE
    quick_start = " ".join(readme.split("## Quick start")[1].split("\n## ")[0].split())  # lines joined
    assert f"about {minutes} minutes of training on a 2-core CPU (step 3's pretraining, {pretrain} s, and step 4's " \
           f"full SFT, {sft} s" in quick_start and "they cannot answer yet" in quick_start
    monkeypatch.setattr(common.paths, "OUT_DIR", tmp_path / "out")
    run_all.main(["--quick", "--from", "99"])
    first_line = (tmp_path / "out" / "quick" / "report.md").read_text().splitlines()[0]
    assert first_line == f"# Quick run: every model here is {QUICK_MODEL_NOTE}"
    assert first_line.startswith("# Quick run: every model here is a seconds-long smoke-test model: it cannot answer")


def test_a_module_run_as_a_file_says_it_is_a_module_and_which_script_uses_it():
    """Never ModuleNotFoundError; bpe.py, a module with a demo, prints help for --help."""
    modules = sorted(p for p in [*REPO_ROOT.glob("step[1-4]_*/*.py"), *REPO_ROOT.glob("common/world/*.py")]
                     if p.name not in ("__init__.py", "bpe.py") and "def main(" not in p.read_text(encoding="utf-8"))
    assert {p.name for p in modules} >= {"lora.py", "chat_template.py", "tasks.py", "corpus.py", "skills.py"}
    for module in modules:
        ran = subprocess.run([sys.executable, module.name], cwd=module.parent, capture_output=True, text=True,
                             timeout=60)
        name = module.relative_to(REPO_ROOT).as_posix()
        assert ran.returncode == 1 and re.fullmatch(rf"{name} is a module, not a script: \S+\.py.* uses? it\n",
                                                    ran.stderr), (name, ran.stderr)
    bpe = subprocess.run([sys.executable, "bpe.py", "--help"], cwd=REPO_ROOT / "step1_tokenizer", capture_output=True,
                         text=True, timeout=60)
    assert bpe.returncode == 0 and bpe.stdout.startswith("usage: bpe.py") and "merges:" not in bpe.stdout
