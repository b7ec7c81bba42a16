"""Step 5, part 2: instruction tuning of the Retro model (step5_retro/sft_retro.py, retro_qa.py), its rows in
eval_retrieval.py and ask.py --retro."""
import json
import random
import re

import numpy as np
import pytest
import torch

from common.cli import UserError
from common.model import IGNORE_INDEX
from common.world.world import build_world
from step4_sft.chat_template import encode_conversation, encode_prompt

QUESTIONS = ["Where does Halra live?", "What is the name of Brenimond's pet?", "Who?",
             "In which part of the land is the town of Evergate, far away from here?",
             "What does Wobkin eat?", "Which color does Lorenwen like best?"]


@pytest.fixture(scope="session")
def tok(quick_run):
    from step1_tokenizer.bpe import load_tokenizer

    return load_tokenizer(quick_run.tokenizer)


@pytest.fixture(scope="session")
def retro_runs(quick_run, tmp_path_factory):
    """A quick Retro model from scratch with its plain twin, then its quick instruction tuning."""
    from step5_retro import sft_retro, train_retro

    out = tmp_path_factory.mktemp("sft_retro")
    tok_args = ["--tokenizer", str(quick_run.tokenizer)]
    pretrained = train_retro.main(["--quick", *tok_args, "--out", str(out)])
    tuned = sft_retro.main(["--quick", *tok_args, "--checkpoint", str(out / "retro_from_scratch.pt"),
                            "--out", str(out)])
    return out, pretrained, tuned


@pytest.mark.verifies(5, "The answer to a Retro question starts on a chunk boundary, whatever the question's length")
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_answer_starts_on_a_chunk_boundary(tok, chunk_size):
    from step5_retro.retro_qa import qa_example, qa_prompt

    leads = set()
    for question in QUESTIONS:
        answer = "Halra lives in Evergate."
        ids, mask = qa_example(tok, question, answer, chunk_size)
        plain_ids, plain_mask = encode_conversation(tok, [{"role": "user", "content": question},
                                                          {"role": "assistant", "content": answer}])
        lead = len(ids) - len(plain_ids)
        first = mask.index(1)
        assert first % chunk_size == 0 and 0 <= lead < chunk_size  # on a boundary, with the least padding
        assert ids == [tok.eot_id] * lead + plain_ids and mask == [0] * lead + plain_mask
        assert qa_prompt(tok, question, chunk_size) == ids[:first]
        assert ids[lead:first] == encode_prompt(tok, [{"role": "user", "content": question}])
        leads.add(lead)
    assert len(leads) > 1  # the questions' lengths did call for different paddings


@pytest.fixture(scope="module")
def question_split(tok):
    from step5_retro.retro_qa import qa_split

    return qa_split(range(900_000, 900_002), tok, chunk_size=16, k=2, block_size=64, progress=False)


@pytest.mark.verifies(5, "Retro's instruction-tuning loss covers exactly the answer tokens and its end-of-turn token")
def test_loss_covers_exactly_the_answer(tok, question_split):
    split, items = question_split
    assert len(items) == len(split.rows) > 50
    for row, item in enumerate(items):
        batch = split.batch(np.array([row]))
        targets = batch["targets"][0]
        expected = tok.encode_ordinary(" " + item["answer"]) + [tok.im_end_id]
        first = next(t for t in range(len(split.rows[row])) if split.scored[row, t])  # position writing token 1
        assert (first + 1) % 16 == 0  # the position that writes the answer's first token ends a chunk
        for t in range(targets.size(0)):
            inside = first <= t < first + len(expected)
            assert bool(split.scored[row, t]) == inside, (row, t)
            assert int(targets[t]) == (expected[t - first] if inside else IGNORE_INDEX), (row, t)


def test_every_chunk_reads_the_question_s_passages_which_state_the_answer(tok, question_split):
    from step5_retro.retro_data import passages, world_library
    from step5_retro.retro_model import NO_TOKEN

    split, items = question_split
    libraries = {s: world_library(build_world(s, "quick"), tok, 16, 2) for s in (900_000, 900_001)}
    for row, item in enumerate(items):
        expected = passages(libraries[item["world"]], item["chunks"], tok.eot_id)
        assert all(np.array_equal(split.neighbours[row, u], expected) for u in range(split.neighbours.shape[1]))
        text = " ".join(tok.decode([t for t in n if t != NO_TOKEN]) for n in expected)
        assert item["holds"] and item["fact"].value in text  # answerable_only: the answer is in the neighbours
        assert not np.array_equal(split.random_neighbours[row, 0], expected)


@pytest.mark.verifies(5, "Instruction tuning lowers the Retro model's answer loss on worlds it never trained on")
def test_quick_sft_lowers_the_answer_loss(retro_runs):
    from step5_retro.retro_fit import measure
    from step5_retro.retro_model import load_retro

    out, _, tuned = retro_runs
    before = measure(load_retro(out / "retro_from_scratch.pt")[0], tuned["val"], "retrieved", 32)["loss"]
    after = tuned["val_answer_loss_retrieved"]
    assert after == measure(load_retro(out / "retro_sft.pt")[0], tuned["val"], "retrieved", 32)["loss"]
    assert after < before - 0.5, (before, after)
    assert (out / "retro_sft_loss.png").stat().st_size > 0 and tuned["steps"] == 30


@pytest.mark.verifies(5, "With the gates at zero the instruction-tuned Retro model answers exactly as its plain "
                         "decoder does")
def test_closed_gates_answer_as_the_plain_decoder(tok, retro_runs, question_split):
    from step5_retro.retro_data import passages, world_library
    from step5_retro.retro_model import load_retro
    from step5_retro.retro_qa import qa_prompt, retro_generate

    out = retro_runs[0]
    model, _ = load_retro(out / "retro_sft.pt")
    _, items = question_split
    library = world_library(build_world(900_000, "quick"), tok, 16, 2)
    cases = [(qa_prompt(tok, it["question"], 16), passages(library, it["chunks"], tok.eot_id)) for it in items[:4]]
    with torch.no_grad():
        idx = torch.tensor([cases[0][0]])
        neighbours = torch.as_tensor(cases[0][1])[None, None].expand(1, idx.size(1) // 16, 2, 32)
        assert not torch.equal(model(idx, neighbours=neighbours)[0], model(idx)[0])  # open: the neighbours count
        for i in model.retro.cca_layers:
            model.decoder.blocks[i].cross_attn.alpha.data.zero_()
        assert torch.equal(model(idx, neighbours=neighbours)[0], model.decoder(idx)[0])
        for prompt, table in cases:
            plain = model.decoder.generate(torch.tensor([prompt]), 12, temperature=0, stop_tokens=[tok.im_end_id])
            plain = plain[0, len(prompt):].tolist()
            plain = plain[:plain.index(tok.im_end_id)] if tok.im_end_id in plain else plain
            assert retro_generate(model, prompt, table, 12, tok.im_end_id) == plain


def test_cca_attention_shown_is_the_one_the_forward_pass_uses():
    from tests.test_step5_retro_model import random_inputs, small_retro

    model = small_retro()
    idx, neighbours = random_inputs(T=30)
    cca = model.decoder.blocks[1].cross_attn
    seen = {}
    hook = cca.register_forward_hook(lambda module, args, output: seen.update(args=args, output=output))
    probs = model.cca_attention(idx, neighbours)[0]  # (B, L, H, m, k*r) of the first CCA layer
    hook.remove()
    x, context = seen["args"]
    queries, memory, key_mask = cca.groups(x, context)
    _, _, v = cca.attn.heads(queries, memory)
    B, L, H, m, S = probs.shape
    y = (probs.reshape(B * L, H, m, S) @ v).transpose(1, 2).reshape(B * L, m, -1)
    y = torch.tanh(cca.alpha) * cca.attn.wo(y).reshape(B, L * m, -1)
    assert torch.allclose(y[:, :idx.size(1) - m + 1], seen["output"][:, m - 1:], atol=1e-6)
    real = key_mask.reshape(B, L, 1, 1, S).any(-1)
    assert torch.allclose(probs.sum(-1), real.float().expand(B, L, H, m), atol=1e-5)


@pytest.mark.verifies(5, "eval_retrieval writes the Retro rows, or names the command that makes a missing Retro "
                         "checkpoint")
def test_eval_retrieval_writes_the_retro_rows(quick_run, retro_runs, tmp_path, capsys):
    from step5_retro import eval_retrieval

    out, pretrained, _ = retro_runs
    args = ["--quick", "--retro_only", "--tokenizer", str(quick_run.tokenizer), "--out", str(tmp_path)]
    metrics = eval_retrieval.main([*args, "--retro_model", str(out / "retro_from_scratch.pt"), "--plain_model",
                                   str(out / "plain_from_scratch.pt"), "--retro_sft_model", str(out / "retro_sft.pt")])
    # the same held-out worlds and rows as train_retro.py's own validation: the same figures
    assert metrics["retro_val_ppl"] == pretrained["retro_val_ppl"]
    assert metrics["retro_val_ppl_no_retrieval"] == pretrained["retro_val_ppl_no_retrieval"]
    assert metrics["gpt_val_ppl"] == pretrained["gpt_val_ppl"]
    replies = [json.loads(line) for line in (tmp_path / "retro_eval_replies.jsonl").open()]
    for reading in ("retro", "retro_no_retrieval", "retro_random_neighbours"):
        rows = [r for r in replies if r["reader"] == reading]
        assert len(rows) == metrics["n_retro_questions"] == 12
        assert metrics[f"qa_em_{reading}"] == sum(r["em"] for r in rows) / len(rows)
        assert metrics[f"qa_f1_{reading}"] == sum(r["f1"] for r in rows) / len(rows)
    edited = [r for r in replies if r["reader"] == "retro_after_edit"]
    assert len(edited) == metrics["n_retro_edits"] > 0 and all(r["value"] != r["old"] for r in edited)
    assert metrics["edited_fact_success_retro"] == sum(r["em"] for r in edited) / len(edited)

    missing = eval_retrieval.main([*args, "--retro_model", str(tmp_path / "none.pt"), "--retro_sft_model",
                                   str(tmp_path / "none_sft.pt")])
    shown = capsys.readouterr().out
    assert "no Retro perplexity rows (run python step5_retro/train_retro.py --quick)" in shown
    assert "no Retro QA rows (run python step5_retro/sft_retro.py --quick)" in shown
    assert not {"retro_val_ppl", "qa_em_retro", "edited_fact_success_retro"} & set(missing)


@pytest.mark.verifies(5, "Editing a fact sheet changes the Retro model's neighbours and its answer logits without "
                         "changing any weight")
def test_edit_changes_neighbours_and_answer_not_weights(tok, retro_runs):
    from step5_retro.eval_retrieval import edit_item
    from step5_retro.retro_data import passages, world_library
    from step5_retro.retro_model import NO_TOKEN, load_retro
    from step5_retro.retro_qa import qa_prompt, question_neighbours

    model, _ = load_retro(retro_runs[0] / "retro_sft.pt")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    world = build_world(900_001, "quick")
    edit = next(e for e in (edit_item(world, tok, 16, 2, random.Random(seed)) for seed in range(50))
                if e is not None and e["holds"])
    library = world_library(world, tok, 16, 2)  # the library before the edit
    before = passages(library, question_neighbours(library, [edit["question"]], 2)[0][0], tok.eot_id)
    text = " ".join(tok.decode([t for t in n if t != NO_TOKEN]) for n in edit["neighbours"])
    assert edit["fact"].value in text and not np.array_equal(before, edit["neighbours"])
    prompt = torch.tensor([qa_prompt(tok, edit["question"], 16)])
    with torch.no_grad():
        logits = [model(prompt, neighbours=torch.as_tensor(t)[None, None].expand(1, prompt.size(1) // 16, 2, 32))[0]
                  for t in (before, edit["neighbours"])]
    assert not torch.equal(logits[0][0, -1], logits[1][0, -1])  # the answer's first token is read differently
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_ask_retro_shows_neighbours_and_attention(quick_run, retro_runs, tmp_path, capsys):
    from step5_retro import ask, build_db

    tok_args = ["--tokenizer", str(quick_run.tokenizer)]
    build_db.main(["--quick", *tok_args, "--out", str(tmp_path / "db")])
    result = ask.main(["--quick", "Where does Halra live?", "--retro", "--show_neighbours", "--show_attention",
                       "--db", str(tmp_path / "db"), "--checkpoint", str(retro_runs[0] / "retro_sft.pt"), *tok_args])
    shown = capsys.readouterr().out
    assert len(re.findall(r"\[\d\] chunk \d+ of document \d+ \(\w+\), score \d\.\d{3}:", shown)) == 2
    assert f"A: {result['answer']}    (retro_sft.pt, 2 neighbours read through CCA)" in shown
    assert "Halra" in result["passages"][0]  # the fact sheet of the entity asked about comes first
    weights = result["attention"]  # one row per answer token: how much it read each neighbour token
    assert weights.shape[1] == 2 * 32 and np.allclose(weights.sum(1), 1, atol=1e-5)
    table = shown.split("reads most in the neighbours (CCA, mean of its layers and heads)\n")[1].splitlines()
    assert len(table) == len(weights) > 0 and all(re.fullmatch(r"  .+ \[[12]\] .+ \d\.\d\d #*", t) for t in table)


@pytest.mark.verifies(5, "A plain checkpoint given to sft_retro.py or ask.py --retro, a Retro one given to ask.py "
                         "without --retro, and another chunk size or k are refused with the command to run")
def test_bad_retro_sft_inputs_are_refused(quick_run, retro_runs, tmp_path):
    from step5_retro import ask, build_db, sft_retro

    out = retro_runs[0]
    tok_args = ["--tokenizer", str(quick_run.tokenizer)]
    with pytest.raises(UserError, match=r"plain model checkpoint where a Retro one is expected .*"
                                        r"python step5_retro/train_retro.py --quick"):
        sft_retro.main(["--quick", *tok_args, "--checkpoint", str(quick_run.model), "--out", str(tmp_path)])
    with pytest.raises(UserError, match=r"reads chunks of 16 tokens and k=2 neighbours, not --chunk_size 8: .*"
                                        r"python step5_retro/train_retro.py --chunk_size 8 --quick"):
        sft_retro.main(["--quick", *tok_args, "--checkpoint", str(out / "retro_from_scratch.pt"), "--chunk_size", "8",
                        "--out", str(tmp_path)])
    build_db.main(["--quick", *tok_args, "--out", str(tmp_path / "db")])
    asking = ["--quick", "Where does Halra live?", "--db", str(tmp_path / "db"), *tok_args]
    with pytest.raises(UserError, match=r"plain model checkpoint where a Retro one is expected .*"
                                        r"python step5_retro/sft_retro.py --quick"):
        ask.main([*asking, "--retro", "--checkpoint", str(quick_run.model)])
    with pytest.raises(UserError, match=r"checkpoint not found; run python step5_retro/sft_retro.py --quick"):
        ask.main([*asking, "--retro", "--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(UserError, match=r"not --k 3: .*python step5_retro/train_retro.py --k 3 --quick"):
        ask.main([*asking, "--retro", "--k", "3", "--checkpoint", str(out / "retro_sft.pt")])
    with pytest.raises(UserError, match=r"a Retro checkpoint; ask it with --retro"):
        ask.main([*asking, "--checkpoint", str(out / "retro_sft.pt")])
