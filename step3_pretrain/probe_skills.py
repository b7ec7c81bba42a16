"""What did pretraining teach? Ask the model to finish sentences it can only finish right if it
learned a fact of the world or learned to add.

    python step3_pretrain/probe_skills.py                 # out/step3/model.pt -> out/step3/metrics.json
    python step3_pretrain/probe_skills.py --checkpoint other.pt --show 10

- facts: each world fact's plain sentence, cut before its value: "Wendel lives in" -> " Caldford".
  exam_facts: the same, on step 4's exam facts only (world.split_facts), never asked in a quiz page.
- sums: every sum step 4's math problems use (result 1..20, second number 1..9), inside a story
  as the skill text writes one: "Belwen has 7 apples. Then Belwen buys 5 more: 7 + 5 =" -> " 12".
- exam_questions: step 4's exam facts asked as a quiz page asks its questions, the whole answer
  expected: "Questions and answers\nQ: In which part of the land is Everstead?\nA:"
  -> " Everstead is in the north."
  What the base model can answer in the layout it read; step 4's SFT teaches the chat layout.
- copying: the skill text's own documents (skills.py, drawn with another seed), cut where the rest
  can only be copied from earlier in the same document: a list written out again as a numbered
  list, a sentence said again with one word changed, a traveler's name or favourite number said
  back. Step 4's lists, rewrites and multi-turn recall ask for the same copying in a chat.

The model answers greedily (its single likeliest continuation). Why measure this: fine-tuning
(step 4) turns what the base model knows into answers; it can teach a little, but a base model that
cannot add leaves SFT to teach adding, and LoRA on two small matrices per layer cannot.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common.checkpoint import load_model
from common.cli import add_common_args, run_main
from common.device import pick_device
from common.metrics import write_metrics
from common.paths import step_dir
from common.world.skills import MAX_NUMBER, MAX_TOTAL, skill_documents
from common.world.world import ask, build_world, phrasings, split_facts
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint

PERSON, ITEM = "Belwen", "apples"  # one world person and one counted thing, as the skill text writes
# Where a skill document is cut for the copying probe, and where its copied part ends: the numbered
# list (shopping_list), the changed sentence (change_of_mind), the name or number said back (introduction).
COPY_CUTS = (("made a numbered list:\n", "\nThere are"), ('and said, "I like', '"'),
             ('"Your name is', ","), ('"What was your favorite number?" "My favorite number is', ","))
N_COPY_PER_CUT = 25


def fact_prompts(world) -> list[tuple[str, str]]:
    """(prompt, expected continuation) for every fact whose plain sentence ends in its value."""
    pairs = []
    for fact in world.facts:
        sentence = phrasings(world, fact)[0]
        if sentence.endswith(" " + fact.value):
            pairs.append((sentence[: -len(fact.value) - 1], " " + fact.value))
    return pairs


def exam_question_prompts(world) -> list[tuple[str, str]]:
    """(prompt, expected answer) for every exam fact, asked as world.quiz_documents writes a question."""
    return [(f"Questions and answers\nQ: {question}\nA:", " " + answer)
            for question, answer in map(ask, split_facts(world)[1])]


def sum_prompts() -> list[tuple[str, str]]:
    """(prompt, expected number) for every a + b and a - b with b <= 9 and the result in 1..20."""
    pairs = []
    for a in range(1, MAX_TOTAL + 1):
        for b in range(1, MAX_NUMBER + 1):
            for op, result, verb in (("+", a + b, f"buys {b} more"), ("-", a - b, f"gives {b} away")):
                if 1 <= result <= MAX_TOTAL:
                    pairs.append((f"{PERSON} has {a} {ITEM}. Then {PERSON} {verb}: {a} {op} {b} =", f" {result}"))
    return pairs


def copy_prompts(world, n_per_cut: int = N_COPY_PER_CUT, seed: int = 1000) -> list[tuple[str, str]]:
    """(document up to the cut, the copied part) for the first n_per_cut skill documents holding each
    of COPY_CUTS. seed: not the corpus's 0, so these documents are new draws (a short one may repeat)."""
    docs = skill_documents(world, target_bytes=200_000, seed=seed)  # 1,237 documents: enough of each cut
    pairs = []
    for cut, end in COPY_CUTS:
        holding = [d for d in docs if cut in d][:n_per_cut]
        for doc in holding:
            head, rest = doc.rsplit(cut, 1)
            pairs.append((head + cut, rest.split(end, 1)[0]))
    return pairs


def ends_right_after(text: str, answer: str) -> bool:
    """text starts with the whole answer, and the answer's word ends there: " 12." is right for
    " 12", but " 1" or " 123" is not, nor " Caldfordshire" for " Caldford"."""
    return text.startswith(answer) and not text[len(answer):len(answer) + 1].isalnum()


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, n_tokens: int) -> str:
    device = next(model.parameters()).device
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)  # <|endoftext|> first: a document starts here
    out = model.generate(torch.tensor([ids], device=device), n_tokens, temperature=0)
    return tokenizer.decode(out[0, len(ids):].tolist())


def probe(model, tokenizer, world) -> dict:
    """Share of facts, sums, exam questions and copies the model completes right, and the prompts it got wrong."""
    was_training = model.training
    model.eval()
    result = {"wrong": {}}
    facts = fact_prompts(world)
    for kind, pairs in (("facts", facts), ("sums", sum_prompts()),
                        ("exam_questions", exam_question_prompts(world)), ("copying", copy_prompts(world))):
        wrong = []
        for prompt, answer in tqdm(pairs, desc=f"probe {kind}", leave=False):
            # a few tokens more than the answer takes, in case the model spells it in more pieces
            got = greedy_continuation(model, tokenizer, prompt, len(tokenizer.encode(answer)) + 2)
            if not ends_right_after(got, answer):
                wrong.append((prompt, answer, got))
        result.update({kind: 1 - len(wrong) / len(pairs), f"n_{kind}": len(pairs)})
        result["wrong"][kind] = wrong
    exam = {phrasings(world, f)[0] for f in split_facts(world)[1]}  # the sentences of the exam facts
    n_exam = sum(prompt + answer in exam for prompt, answer in facts)
    wrong_exam = sum(prompt + answer in exam for prompt, answer, _ in result["wrong"]["facts"])
    result["exam_facts"] = 1 - wrong_exam / n_exam if n_exam else float("nan")  # nan: no exam fact to probe
    model.train(was_training)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model file (default out/step3/model.pt)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--show", type=int, default=5, help="print this many wrong completions of each kind")
    add_common_args(parser)
    args = parser.parse_args(argv)
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    model = load_model(args.checkpoint or step_dir(3) / "model.pt", pick_device(args.device),
                       tokenizer_fingerprint=fingerprint)
    result = probe(model, tokenizer, build_world(args.seed, "quick" if args.quick else "default"))
    for kind in result["wrong"]:  # facts, sums, exam_questions, copying
        print(f"{kind}: {result[kind]:.1%} of {result['n_' + kind]} completed right")
        if kind == "facts":
            print(f"   of them step 4's exam facts, never asked in a quiz page: {result['exam_facts']:.1%}")
        for prompt, expected, got in result["wrong"][kind][: args.show]:
            print(f"   {prompt!r} -> {got!r} (expected {expected!r})")
    if args.checkpoint is None:  # the default model's figures are step 3's; another model's are not
        write_metrics(3, {kind: round(result[kind], 4) for kind in [*result["wrong"], "exam_facts"]}, section="probe")
    return result


if __name__ == "__main__":
    run_main(main)
