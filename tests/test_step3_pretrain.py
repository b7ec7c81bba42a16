"""Step 3 -- pretraining: data on disk, the shared training loop, exact resume, DDP."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.cli import UserError
from common.metrics import read_metrics
from common.model import ModelConfig, Transformer
from common.train import TrainConfig, lr_at, make_optimizer, train
from common.world.corpus import default_documents
from step1_tokenizer.bpe import Tokenizer
from step3_pretrain import data, train_pretrain
from step3_pretrain.eval_ppl import evaluate_stream, token_byte_lengths
from tests.verification import REPO_ROOT


def pretrain_args(run, out, *extra):
    return ["--quick", "--data", str(run.data), "--tokenizer", str(run.tokenizer), "--out", str(out), *extra]


def losses(out_dir):
    return load_checkpoint(out_dir / "checkpoint.pt")["history"]["loss"]


@pytest.mark.verifies(3, "the token files decode back to the corpus documents, each ended by <|endoftext|>")
def test_token_files_decode_to_the_documents(quick_run):
    tokenizer = Tokenizer.load(quick_run.tokenizer)
    train_docs, val_docs = default_documents(quick=True)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens, meta = data.load_tokens(quick_run.data, split, quick_run.tokenizer)
        assert meta[split]["documents"] == len(docs)
        ids = tokens.tolist()
        assert ids.count(tokenizer.eot_id) == len(docs) and ids[-1] == tokenizer.eot_id
        pieces, start = [], 0
        for end in (i for i, t in enumerate(ids) if t == tokenizer.eot_id):
            pieces.append(tokenizer.decode(ids[start:end]))
            start = end + 1
        assert pieces == docs


@pytest.mark.verifies(3, "pretraining brings the validation loss far below a uniform guess over the vocabulary")
def test_pretraining_learns(quick_run):
    result = quick_run.pretrain_result
    uniform = math.log(Tokenizer.load(quick_run.tokenizer).vocab_size)
    history = result["history"]
    assert history["loss"][0] > 0.9 * uniform          # an untrained model is close to uniform
    assert result["val_loss"] < 0.85 * uniform  # quick profile measured 4.90 vs uniform 6.24
    assert (quick_run.pretrain / "loss_curve.png").stat().st_size > 1000


@pytest.mark.verifies(3, "bits per byte is the total loss in bits divided by the text's UTF-8 bytes")
def test_bits_per_byte_of_a_uniform_model():
    tokenizer = Tokenizer([], ["<|endoftext|>"])             # bytes only: 257 ids
    text = "héllo, wörld! " * 20
    tokens = np.array(tokenizer.encode(text), dtype=np.int64)
    model = Transformer(ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    torch.nn.init.zeros_(model.lm_head.weight)                # every logit 0: a uniform guess
    result = evaluate_stream(model, tokens, token_byte_lengths(tokenizer), block_size=16)
    n = result["tokens"]
    assert n == (len(tokens) - 1) // 16 * 16
    assert result["loss"] == pytest.approx(math.log(257))
    assert result["bytes"] == n                               # byte-level: one byte per token
    assert result["bpb"] == pytest.approx(math.log2(257))


@pytest.mark.verifies(3, "an interrupted run (Ctrl-C, or killed between checkpoints) resumes to exactly "
                         "the uninterrupted run's losses")
def test_resume_is_exact(quick_run, tmp_path, monkeypatch):
    reference = losses(quick_run.pretrain)
    real_windows = train_pretrain.random_windows

    def interrupt_at(step, error):
        def windows(tokens, block_size, batch_size, seed, s, micro):
            if s == step:
                raise error
            return real_windows(tokens, block_size, batch_size, seed, s, micro)
        return windows

    # Ctrl-C at step 8: a checkpoint is saved on the way out, at step 8.
    monkeypatch.setattr(train_pretrain, "random_windows", interrupt_at(8, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train_pretrain.main(pretrain_args(quick_run, tmp_path / "ctrl_c"))
    assert load_checkpoint(tmp_path / "ctrl_c" / "checkpoint.pt")["step"] == 8
    # A crash at step 20 saves nothing: the quick profile's last checkpoint is at step 15.
    monkeypatch.setattr(train_pretrain, "random_windows", interrupt_at(20, RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        train_pretrain.main(pretrain_args(quick_run, tmp_path / "killed"))
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 15

    monkeypatch.setattr(train_pretrain, "random_windows", real_windows)
    with pytest.raises(UserError, match="weights do not fit this model.*resume with the options it was started"):
        train_pretrain.main(pretrain_args(quick_run, tmp_path / "ctrl_c", "--resume", "--smear_keys"))
    for name in ("ctrl_c", "killed"):
        train_pretrain.main(pretrain_args(quick_run, tmp_path / name, "--resume"))
        assert losses(tmp_path / name) == reference    # exactly, float for float


@pytest.mark.verifies(3, "two DDP processes reproduce the losses of one process with the same global batch")
def test_ddp_matches_one_process(quick_run, tmp_path):
    """Two processes (each 4 sequences a step) against one (2 micro-batches of 4): the same losses, float for
    float. What made this test flaky once, and is pinned here so that nothing depends on the machine:
    - the device: on a CUDA machine "auto" would give both ranks a GPU (rank 1 asks for cuda:1; one GPU has
      cuda:0 only) and train in bf16 under autocast; --device cpu runs gloo and float32 everywhere;
    - the threads: matmuls split over another number of threads add in another order (1e-7 apart here with
      8 threads against torchrun's 1), so both sides run on exactly one thread (--threads 1, and
      OMP_NUM_THREADS=1 for the workers torchrun starts).
    Then the arithmetic is the same on both sides: each rank's gradient is halved, and the sum of two halves
    is exact in either order, so the losses are bitwise equal, as for --resume."""
    same = ("--device", "cpu", "--threads", "1", "--batch_size", "4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "step3_pretrain/train_pretrain.py", *pretrain_args(quick_run, tmp_path / "ddp", *same)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    train_pretrain.main(pretrain_args(quick_run, tmp_path / "single", *same, "--grad_accum", "2"))
    two, one = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(two) == len(one) == 30
    assert two == one, [(step, a, b) for step, (a, b) in enumerate(zip(two, one)) if a != b][:3]


@pytest.mark.verifies(3, "a NaN loss stops training with a clear message and keeps the last good checkpoint")
def test_nan_stops_and_keeps_the_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    tokens = np.arange(1000) % 32

    def batches(step, micro):
        if step == 7:  # something goes badly wrong: a weight becomes NaN
            with torch.no_grad():
                model.tok_emb.weight[tokens[:9]] = float("nan")
        return train_pretrain.random_windows(tokens, 8, 4, 0, step, micro)

    cfg = TrainConfig(max_steps=10, batch_size=4, warmup_steps=1, eval_every=0, ckpt_every=5)
    with pytest.raises(UserError, match="loss became nan at step 7.*last good checkpoint"):
        train(model, cfg, batches, device=torch.device("cpu"), checkpoint_path=tmp_path / "ck.pt")
    kept = load_checkpoint(tmp_path / "ck.pt")
    assert kept["step"] == 5
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


@pytest.mark.verifies(3, "norms and biases get no weight decay, and the learning rate warms up then decays")
def test_optimizer_groups_and_schedule():
    model = Transformer(ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_kv_head=1, n_embd=16))
    cfg = TrainConfig(max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1)
    decay, no_decay = make_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    norm_ids = {id(p) for name, p in model.named_parameters() if "norm" in name}
    assert {id(p) for p in no_decay["params"]} == norm_ids
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway through the cosine
    assert lr_at(100, cfg) == pytest.approx(1e-4)


@pytest.mark.verifies(3, "a token file from another tokenizer, a corrupt checkpoint or a block size longer "
                         "than the data is refused with what to run")
def test_bad_inputs_say_what_to_run(quick_run, tmp_path):
    other = tmp_path / "other_tokenizer.json"
    Tokenizer([(104, 105)]).save(other)
    with pytest.raises(UserError, match="different tokenizer.*step3_pretrain/data.py"):
        data.load_tokens(quick_run.data, "train", other)
    with pytest.raises(UserError, match="longer than the data"):
        train_pretrain.main(pretrain_args(quick_run, tmp_path / "x", "--block_size", "10000000"))
    corrupt = tmp_path / "model.pt"
    corrupt.write_bytes(quick_run.model.read_bytes()[:1000])
    from step3_pretrain import sample
    with pytest.raises(UserError, match="model.pt: not a checkpoint of this tutorial .*; run python "
                                        "step3_pretrain/train_pretrain.py --quick to make one$"):
        sample.main(["--checkpoint", str(corrupt), "--tokenizer", str(quick_run.tokenizer)])


def test_a_pickle_with_code_is_refused_without_passing_on_the_advice_to_unpickle_it(tmp_path):
    """torch.load(weights_only=True) refuses a pickled object; its message advises weights_only=False, which
    would run the file's code: the learner sees what the file is not and which command makes a good one."""
    from pathlib import PurePosixPath

    from common.checkpoint import load_checkpoint

    torch.save({"config": PurePosixPath("a")}, tmp_path / "code.pt")  # a class to import: weights_only refuses it
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path / "code.pt", hint="python step4_sft/train_sft.py")
    assert str(err.value) == (f"{tmp_path / 'code.pt'}: not a checkpoint of this tutorial (it does not load as "
                              "tensors and plain values: cut short, or another program's file); run python "
                              "step4_sft/train_sft.py to make one")
    assert "weights_only" not in str(err.value)


def test_echo_games_make_a_corpus_of_their_own(quick_run, tmp_path):
    tokenizer = Tokenizer.load(quick_run.tokenizer)
    meta = data.main(["--quick", "--echo_games", "200", "--tokenizer", str(quick_run.tokenizer),
                      "--out", str(tmp_path)])
    assert meta["source"] == "200 echo games" and (meta["train"]["documents"], meta["val"]["documents"]) == (196, 4)
    tokens, _ = data.load_tokens(tmp_path, "val", quick_run.tokenizer)
    games = tokenizer.decode([t for t in tokens.tolist() if t != tokenizer.eot_id])
    assert games.count("played the echo game") == 4 and games.count("The children said back:") == 4
    with pytest.raises(UserError, match="40 echo games: 40 documents, but at least 50 different ones"):
        data.main(["--quick", "--echo_games", "40", "--tokenizer", str(quick_run.tokenizer), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="a folder of its own, e.g. --out out/echo_only"):
        data.main(["--quick", "--echo_games", "200", "--tokenizer", str(quick_run.tokenizer)])
    with pytest.raises(UserError, match="--input or --echo_games, not both"):
        data.main(["--echo_games", "40", "--input", str(tmp_path / "any.txt")])


@pytest.mark.verifies(3, "the step 3 notebook runs top to bottom and shows the loss curve")
def test_notebook_runs():
    from tests.notebooks import has_image, outputs_text, run_notebook

    notebook = run_notebook("step3_pretrain/step3_pretrain.ipynb")
    assert "validation loss now" in outputs_text(notebook)
    assert has_image(notebook)


def test_rope_of_three_operations_is_the_textbook_rotation_and_ops_bench_runs():
    from step3_pretrain import bench_throughput
    from common.model import apply_rope, rope_tables
    cos, sin = rope_tables(8, 5)
    x = torch.arange(2 * 5 * 8, dtype=torch.float32).reshape(1, 2, 5, 8) / 10
    x1, x2 = x.chunk(2, dim=-1)  # pairs (i, i + 4), angle position * 10000^(-2i/8)
    angle = torch.arange(5.0)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)
    ops = bench_throughput.main(["--ops", "--quick"])
    assert set(ops) == {"rope_us", "textbook_rope_us", "rms_norm_us", "layer_norm_us"} and min(ops.values()) > 0


def test_profile_counts_three_matrix_products_per_linear_layer_per_step():
    """Forward x W^T, and backward one product for the input's gradient and one for W's: 7 linear
    layers per block (q, k, v, o, gate, up, down) and the tied output head."""
    from step3_pretrain import bench_throughput
    rows = {name: calls for name, calls, _ in bench_throughput.main(["--profile", "--quick"])}
    n_layer = bench_throughput.NANOGPT_CPU["n_layer"]
    assert rows["aten::mm"] == 3 * (7 * n_layer + 1) == 87


def test_probe_counts_a_completion_right_only_when_it_is_exactly_the_answer(quick_run, monkeypatch, tmp_path):
    from common.world.world import ask, build_world, phrasings, split_facts
    from step3_pretrain import probe_skills

    world = build_world(0)
    facts, sums = probe_skills.fact_prompts(world), probe_skills.sum_prompts()
    assert len(sums) == 270 and ("Belwen has 7 apples. Then Belwen buys 5 more: 7 + 5 =", " 12") in sums
    assert ("Belwen has 12 apples. Then Belwen gives 9 away: 12 - 9 =", " 3") in sums
    assert ("Wendel lives in", " Caldford") in facts and len(facts) == 276
    questions = probe_skills.exam_question_prompts(world)  # step 4's exam questions, as a quiz page asks
    exam_answers = {ask(f)[1] for f in split_facts(world)[1]}
    assert len(questions) == len(exam_answers) == 56 and {a[1:] for _, a in questions} == exam_answers
    assert all(p.startswith("Questions and answers\nQ: ") and p.endswith("?\nA:") for p, _ in questions)
    # copying: each kind of cut 25 times, and what is to be copied stands earlier in the same document
    copies = probe_skills.copy_prompts(world)
    assert len(copies) == 100 and copies[0] == (
        "Vinadric wrote down what to buy: dragon, hare, otter. At home Vinadric made a numbered list:\n",
        "1. dragon\n2. hare\n3. otter")
    for prompt, answer in copies[:25]:  # the numbered list: the shopping list's words, in order
        bought = prompt.split("what to buy: ")[1].split(". At home")[0].split(", ")
        assert answer.split("\n") == [f"{i}. {w}" for i, w in enumerate(bought, 1)]
    for prompt, answer in copies[25:50]:  # the sentence said again, with the one word changed
        said = prompt.split('said, "I like ')[1].split('."')[0]
        old, new = re.search(r"changed one word, (\w+) for (\w+),", prompt).groups()
        assert answer == " " + re.sub(rf"\b{old}\b", new, said) + "." != " " + said + "."
    for prompt, answer in copies[50:75]:  # the traveler's name said back is the one said on arrival
        assert re.search(rf'"(Hello, my name is|I am|Call me){re.escape(answer)}," said the traveler', prompt)
    for prompt, answer in copies[75:]:  # and so is the favourite number
        assert prompt.count(f'"My favorite number is{answer}."') == 1 and prompt.endswith("My favorite number is")
    # A stand-in model: right on every other prompt (the answer, then more text), and on the rest
    # one character short (" 1." for " 12") or one too long (" Caldfordx"): both must count as wrong.
    answers = dict(facts + sums + questions + copies)
    order = {p: i for i, (p, _) in enumerate(facts + sums + questions + copies)}

    def stand_in(model, tokenizer, prompt, n_tokens):
        answer = answers[prompt]
        if order[prompt] % 2 == 0:
            return answer + ". And"
        return answer[:-1] + "." if prompt.endswith("=") else answer + "x"
    monkeypatch.setattr(probe_skills, "greedy_continuation", stand_in)
    result = probe_skills.probe(torch.nn.Linear(1, 1), Tokenizer.load(quick_run.tokenizer), world)
    assert result["facts"] == 138 / 276 and result["sums"] == 135 / 270 and result["exam_questions"] == 28 / 56
    assert result["copying"] == 50 / 100
    exam = [phrasings(world, f)[0] for f in split_facts(world)[1]]  # step 4's exam: scored apart too
    exam_right = [order[p] % 2 == 0 for p, a in facts if p + a in exam]
    assert len(exam_right) > 40 and result["exam_facts"] == sum(exam_right) / len(exam_right)
    assert result["wrong"]["sums"][0] == (sums[1][0], sums[1][1], sums[1][1][:-1] + ".")
    # and the real script runs on the quick model (its figures are not step 3's: no metrics written
    # where this --quick run would write step 3's, out/quick/step3/)
    monkeypatch.undo()
    monkeypatch.setattr("common.paths.OUT_DIR", tmp_path / "out")  # nothing there: no quick model yet
    real = probe_skills.main(["--quick", "--checkpoint", str(quick_run.model), "--tokenizer", str(quick_run.tokenizer)])
    assert 0 <= real["facts"] <= 1 and real["n_sums"] == 270 and "probe" not in read_metrics(3)
    with pytest.raises(UserError, match=r"model.pt: checkpoint not found; run python "
                                        r"step3_pretrain/train_pretrain.py --quick to make one$"):
        probe_skills.main(["--quick", "--tokenizer", str(quick_run.tokenizer)])


def test_gpt2_reference_has_nanogpts_parameter_count_is_causal_and_the_comparison_runs():
    """nanoGPT prints 0.80M for its CPU recipe (it leaves out the position table): tied V*C, T*C
    positions, per block two norm gains, q,k,v (3C^2), the output projection (C^2), the MLP (8C^2)."""
    from step3_pretrain import bench_throughput
    from step3_pretrain.gpt2_reference import GPT2

    V, T, L, C = (bench_throughput.NANOGPT_CPU[k] for k in ("vocab_size", "block_size", "n_layer", "n_embd"))
    torch.manual_seed(0)
    model = GPT2(**bench_throughput.NANOGPT_CPU)
    assert sum(p.numel() for p in model.parameters()) == V * C + T * C + L * (2 * C + 12 * C * C) + C == 804_096
    idx = torch.randint(0, V, (1, 10))
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % V
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :6], after[:, :6])  # positions before 6 never see token 6
    assert not torch.allclose(before[:, 6], after[:, 6])
    result = bench_throughput.main(["--against_gpt2", "--quick"])  # --quick: eager only, 2 rounds
    assert set(result) == {"ours", "nanogpt", "nanogpt_fused_adamw"}
    assert result["nanogpt"]["median_ratio_to_nanogpt"] == 1.0
    assert result["ours"]["median_tokens_per_sec"] > 0


def test_other_text_gets_a_folder_of_its_own_and_never_replaces_the_tutorials_model(quick_run, tmp_path, monkeypatch,
                                                                                   capsys):
    import common.paths

    monkeypatch.setattr(common.paths, "OUT_DIR", tmp_path / "out")
    text = tmp_path / "my_text.txt"
    text.write_text("\n\n".join(f"Note {i}: the river runs past mill number {i}, and the miller waves." for i in
                                range(100)))
    data.main(["--quick", "--input", str(text), "--tokenizer", str(quick_run.tokenizer)])
    own = tmp_path / "out" / "quick" / "step3" / "my_text"
    assert (own / "train.bin").exists() and not (tmp_path / "out" / "quick" / "step3" / "train.bin").exists()
    assert f"next: python step3_pretrain/train_pretrain.py --data {own} --quick" in capsys.readouterr().out
    train_pretrain.main(["--quick", "--data", str(own), "--tokenizer", str(quick_run.tokenizer), "--block_size", "16",
                         "--max_steps", "2"])
    assert (own / "model.pt").exists() and not (tmp_path / "out" / "quick" / "step3" / "model.pt").exists()


def test_a_tokenizer_retrained_on_other_text_with_the_same_vocabulary_size_is_refused(quick_run, tmp_path):
    """Every script that loads a model and a tokenizer checks the fingerprint the training script saved."""
    from common.checkpoint import save_checkpoint
    from common.world.world import build_world, generate_documents
    from step1_tokenizer.bpe import train_bpe
    from step2_model import attention_map
    from step3_pretrain import eval_ppl, probe_skills, sample
    from step4_sft import chat, seed_table, train_sft
    from step6_multimodal import train_vlm

    ours = Tokenizer.load(quick_run.tokenizer)
    other = train_bpe(generate_documents(build_world(1, "quick"), n_docs=300), vocab_size=ours.vocab_size)
    assert other.vocab_size == ours.vocab_size and other.merges != ours.merges
    other.save(tmp_path / "other.json")
    saved = load_checkpoint(quick_run.model)
    assert saved["tokenizer_fingerprint"] == data.tokenizer_fingerprint(quick_run.tokenizer)
    refused = (rf"^{re.escape(str(quick_run.model))} was trained with another tokenizer \(fingerprint "
               rf"{saved['tokenizer_fingerprint']}\) than the one given \(fingerprint "
               rf"{data.tokenizer_fingerprint(tmp_path / 'other.json')}\): pass the --tokenizer it was trained with")
    for script in (attention_map, sample, eval_ppl, probe_skills, train_sft, chat, train_vlm):
        with pytest.raises(UserError, match=refused):
            script.main(["--quick", "--checkpoint", str(quick_run.model), "--tokenizer", str(tmp_path / "other.json")])
    with pytest.raises(UserError, match=refused):
        seed_table.main(["--quick", "--probe", str(quick_run.model), "--tokenizer", str(tmp_path / "other.json")])
    del saved["tokenizer_fingerprint"]  # a checkpoint from before fingerprints: nothing to compare, accepted
    save_checkpoint(saved, tmp_path / "old.pt")
    texts = sample.main(["--quick", "--checkpoint", str(tmp_path / "old.pt"), "--tokenizer",
                         str(tmp_path / "other.json"), "--n", "1", "--max_new_tokens", "3"])
    assert len(texts) == 1
