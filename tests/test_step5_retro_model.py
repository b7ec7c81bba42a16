"""Step 5, part 2: Retro's chunked cross-attention (step5_retro/retro_model.py), its data
(retro_data.py) and its training script (train_retro.py)."""
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.cli import UserError
from common.model import ModelConfig, Transformer
from step5_retro.retro_model import (NO_TOKEN, RetroConfig, RetroModel, check_database, check_neighbours,
                                     load_plain, load_retro)

M, K = 4, 2  # chunk size and neighbours of the small model below


def small_retro(gate: float = 0.5, seed: int = 0, condition: bool = True, zero_output: bool = False) -> RetroModel:
    """A tiny Retro model; gate: the value every alpha is set to (0 keeps the gates shut)."""
    torch.manual_seed(seed)
    decoder = Transformer(ModelConfig(vocab_size=50, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=32))
    model = RetroModel(decoder, RetroConfig(chunk_size=M, k=K, cca_layers=[1, 2], encoder_layers=1,
                                            condition=condition, zero_output=zero_output))
    for i in model.retro.cca_layers:
        model.decoder.blocks[i].cross_attn.alpha.data.fill_(gate)
    return model.eval()


def random_inputs(T: int = 30, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50, (2, T), generator=g)
    neighbours = torch.randint(0, 50, (2, T // M, K, 2 * M), generator=g)
    neighbours[:, :, 1, M + 1:] = NO_TOKEN  # a continuation cut short by its document's end
    return idx, neighbours


@pytest.mark.verifies(5, "Changing the neighbours of chunk u never changes the logits at any position before "
                         "the last token of chunk u (checked position by position)")
@pytest.mark.parametrize("condition", [True, False])
def test_chunk_neighbours_reach_only_positions_from_its_last_token(condition):
    model = small_retro(condition=condition)
    idx, neighbours = random_inputs()
    with torch.no_grad():
        before, _ = model(idx, neighbours=neighbours)
        for u in range(neighbours.size(1)):
            changed = neighbours.clone()
            changed[:, u] = (changed[:, u] + 7) % 50
            after, _ = model(idx, neighbours=changed)
            first_reader = u * M + M - 1  # the last token of chunk u
            for pos in range(idx.size(1)):
                same = torch.equal(before[:, pos], after[:, pos])
                assert same == (pos < first_reader), (u, pos)


@pytest.mark.verifies(5, "The first m-1 positions' logits depend on no neighbour")
def test_first_positions_read_no_neighbour():
    model = small_retro()
    idx, neighbours = random_inputs()
    with torch.no_grad():
        with_them, _ = model(idx, neighbours=neighbours)
        others, _ = model(idx, neighbours=(neighbours * 3 + 1) % 50)
        alone, _ = model(idx)  # retrieval off
    assert torch.equal(with_them[:, :M - 1], others[:, :M - 1])
    assert torch.equal(with_them[:, :M - 1], alone[:, :M - 1])
    assert not torch.equal(with_them[:, M - 1], others[:, M - 1])  # the last token of chunk 0 does read


def plain_decoder_and_its_logits(idx):
    """small_retro's decoder before any CCA is plugged in (the same seed, the same weights), and its logits."""
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(vocab_size=50, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        return plain.eval(), plain(idx)[0]


@pytest.mark.verifies(5, "With the gate at zero the Retro model equals the plain decoder exactly")
def test_closed_gate_equals_plain_decoder():
    idx, neighbours = random_inputs()
    plain, expected = plain_decoder_and_its_logits(idx)
    model = small_retro(gate=0.0)
    model.decoder.load_state_dict({**model.decoder.state_dict(), **plain.state_dict()})
    with torch.no_grad():
        got, _ = model(idx, neighbours=neighbours)
    assert torch.equal(got, expected)
    model.decoder.blocks[1].cross_attn.alpha.data.fill_(0.1)  # and the gate is what makes the difference
    with torch.no_grad():
        assert not torch.equal(model(idx, neighbours=neighbours)[0], expected)


@pytest.mark.verifies(5, "With CCA's output projection at zero and the gate open the Retro model equals the plain "
                         "decoder exactly")
def test_zero_output_projection_with_open_gate_equals_plain_decoder():
    idx, neighbours = random_inputs()
    plain, expected = plain_decoder_and_its_logits(idx)
    model = small_retro(gate=2.0, zero_output=True)
    model.decoder.load_state_dict({**model.decoder.state_dict(), **plain.state_dict()})
    assert all(g > 0.96 for g in model.gates())
    with torch.no_grad():
        got, _ = model(idx, neighbours=neighbours)
    assert torch.equal(got, expected)
    model.decoder.blocks[1].cross_attn.attn.wo.weight.data.fill_(0.01)  # and the projection is what makes it so
    with torch.no_grad():
        assert not torch.equal(model(idx, neighbours=neighbours)[0], expected)


def test_each_distinct_neighbour_encoded_once_gives_the_same_memory():
    model = small_retro(condition=False)
    idx, neighbours = random_inputs()
    neighbours[:, 3] = neighbours[:, 2]  # consecutive chunks that retrieved the same passages
    states = torch.zeros(2, idx.size(1), 32)
    with torch.no_grad():
        memory, real = model.encode(neighbours, states)
        tokens = neighbours[:, :idx.size(1) // M].reshape(-1, 2 * M)
        one_by_one = torch.cat([model.encoder(model.decoder.embed(t[None].clamp(min=0)), t[None] != NO_TOKEN)
                                for t in tokens])
    assert torch.allclose(memory.reshape(-1, 2 * M, 32), one_by_one, atol=1e-6)
    assert torch.equal(real.reshape(-1, 2 * M), tokens != NO_TOKEN)


def test_padding_only_neighbour_gives_finite_logits():
    model = small_retro()
    idx, neighbours = random_inputs()
    neighbours[0, 2] = NO_TOKEN  # chunk 2 of row 0 found nothing at all
    with torch.no_grad():
        logits, _ = model(idx, neighbours=neighbours)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="session")
def world_split(quick_run):
    from step1_tokenizer.bpe import load_tokenizer
    from step5_retro.retro_data import retro_split

    tokenizer = load_tokenizer(quick_run.tokenizer)
    return tokenizer, retro_split(range(1000, 1003), tokenizer, block_size=64, chunk_size=16, k=2, progress=False)


@pytest.mark.verifies(5, "Fact marks cover exactly the tokens of the world's names and values")
def test_fact_marks_are_the_value_tokens(world_split):
    from step5_retro.retro_data import encode_marked

    tokenizer, _ = world_split
    text = "Orona is a shepherd. Her best friend, Brenimond, likes green apples."
    ids, marks = encode_marked(tokenizer, text, {"shepherd", "Brenimond", "green", "Orona"})
    marked_text = tokenizer.decode([t for t, m in zip(ids, marks) if m])
    assert marked_text.split() == ["Orona", "shepherd", "Brenimond", "green"]
    assert tokenizer.decode([t for t, m in zip(ids, marks) if not m]) == " is a. Her best friend,, likes apples."


@pytest.mark.verifies(5, "Each chunk's neighbours are fact sheets of its own world, each with its continuation")
def test_neighbours_come_from_the_chunk_s_own_world(world_split):
    from common.world.world import build_world, documents_about

    tokenizer, split = world_split
    sheets = {s: [documents_about(w, e)[0] for e in w.entities] for s, w in
              ((s, build_world(s, "quick")) for s in range(1000, 1003))}
    m, continued = split.meta["chunk_size"], 0
    for row in range(len(split.rows)):
        for neighbour in split.neighbours[row].reshape(-1, 2 * m):
            text = tokenizer.decode([t for t in neighbour if t != NO_TOKEN])
            assert any(text in doc for doc in sheets[split.world[row]]), (row, text)
            continued += neighbour[m] != NO_TOKEN
    assert continued > 0  # some neighbours do carry a continuation
    assert set(split.world) == {1000, 1001, 1002}


def test_retrieval_dropout_blanks_whole_rows_and_keeps_the_rest(world_split):
    from step5_retro.retro_fit import batch_fn

    _, split = world_split
    kept, dropped_rows = batch_fn(split, 64, 7, True)(3, 0), batch_fn(split, 64, 7, True, 0.3)(3, 0)
    assert torch.equal(kept["idx"], dropped_rows["idx"])  # the same rows; only their neighbours differ
    blank = (dropped_rows["neighbours"] == NO_TOKEN).flatten(1).all(1)
    assert 10 <= int(blank.sum()) <= 30  # about 0.3 of 64 rows (19) read nothing
    assert torch.equal(dropped_rows["neighbours"][~blank], kept["neighbours"][~blank])
    assert not (kept["neighbours"] == NO_TOKEN).flatten(1).all(1).any()
    assert set(batch_fn(split, 4, 7, False)(0, 0)) == {"idx", "targets"}  # the plain model reads none


def test_retrofit_takes_its_own_defaults_and_every_given_flag_wins():
    from step5_retro.train_retro import parse_args, run_settings

    def settings(*flags):
        s = run_settings(parse_args(["--quick", *flags]), torch.device("cpu"))
        return s["max_steps"], s["train_worlds"], s["retrieval_dropout"], s["zero_output"], s["gate_init"]

    assert settings() == (30, 20, 0.3, False, 2.0)                # from scratch: the quick profile's
    assert settings("--retrofit") == (15, 10, 0.0, True, 2.0)     # half the steps and worlds, no dropout
    assert settings("--retrofit", "--max_steps", "7", "--train_worlds", "5",
                    "--retrieval_dropout", "0.1") == (7, 5, 0.1, True, 2.0)
    assert settings("--retrofit", "--zero_output", "false") == (15, 10, 0.0, False, 0.0)  # the gate shut


# ----------------------------------------------------------------------------- training runs

@pytest.fixture(scope="session")
def retrofit_run(quick_run, tmp_path_factory):
    from step5_retro import train_retro

    out = tmp_path_factory.mktemp("retrofit")
    result = train_retro.main(["--quick", "--retrofit", "--tokenizer", str(quick_run.tokenizer),
                               "--base", str(quick_run.model), "--out", str(out)])
    return result, out


@pytest.mark.verifies(5, "A RETRO-fitted model's base weights are unchanged by training")
def test_retrofit_leaves_base_weights_unchanged(quick_run, retrofit_run):
    result, out = retrofit_run
    base = load_checkpoint(quick_run.model)["model"]
    saved = load_checkpoint(out / "retro_retrofit.pt")["model"]
    decoder_own = {k[len("decoder."):] for k in saved if k.startswith("decoder.") and ".cross_" not in k}
    assert decoder_own == set(base)
    for name in base:
        assert torch.equal(saved["decoder." + name], base[name]), name
    assert not any(p.requires_grad for _, p in result["model"].base_parameters())
    # and training did happen: CCA's output projections, zero at the start (--retrofit's default), moved
    assert result["settings"]["zero_output"]
    projections = [saved[f"decoder.blocks.{i}.cross_attn.attn.wo.weight"] for i in result["settings"]["cca_layers"]]
    assert projections and all(bool(w.any()) for w in projections)
    assert any(name.startswith("encoder.") for name in saved)


@pytest.mark.verifies(5, "One RETRO-fitting step moves CCA's output projection off zero and leaves the base "
                         "weights unchanged")
@pytest.mark.parametrize("zero_output", [True, False])
def test_first_retrofit_step_reaches_the_output_projection_only_when_it_starts_at_zero(quick_run, world_split,
                                                                                       zero_output):
    from common.train import TrainConfig, make_optimizer

    _, split = world_split
    base = load_plain(quick_run.model)
    # Two ways to start as exactly the base: the projection at zero with the gate open, or the gate shut.
    retro = RetroConfig(chunk_size=16, k=2, cca_layers=[base.config.n_layer - 1], encoder_layers=1,
                        condition=False, gate_init=2.0 if zero_output else 0.0, zero_output=zero_output)
    model = RetroModel(base, retro).train()
    model.freeze_base()
    before = {name: p.detach().clone() for name, p in model.base_parameters()}
    batch = split.batch(torch.arange(8).numpy())
    _, loss = model(batch["idx"], batch["targets"], neighbours=batch["neighbours"])
    loss.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    cca = f"decoder.blocks.{retro.cca_layers[0]}.cross_attn."
    # The projection's input, the attention output, is not zero: it alone learns at the first step (the rest of
    # CCA and the encoder sit behind it, at zero). With the gate shut, only the gate itself gets a gradient.
    assert reached == ({cca + "attn.wo.weight"} if zero_output else {cca + "alpha"})
    wo = dict(model.named_parameters())[cca + "attn.wo.weight"]
    assert bool((wo == 0).all()) == zero_output
    make_optimizer(model, TrainConfig(lr=1e-3)).step()
    assert bool((wo != 0).all())  # every weight of the projection moved off zero
    for name, p in model.base_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.verifies(5, "With retrieval off the loss equals the base model's")
def test_retrofit_without_retrieval_is_its_base(retrofit_run):
    from step5_retro.train_retro import EVAL_ROWS, measure

    result, _ = retrofit_run
    off = measure(result["model"], result["val"], "off", EVAL_ROWS["quick"])
    assert off == measure(result["plain_model"], result["val"], "off", EVAL_ROWS["quick"])
    assert off == result["retro"]["off"]
    assert result["retro"]["retrieved"] != off  # with its neighbours it computes something else


def test_from_scratch_quick_run_writes_its_figures(quick_run, tmp_path):
    from step5_retro import train_retro

    result = train_retro.main(["--quick", "--tokenizer", str(quick_run.tokenizer), "--out", str(tmp_path)])
    assert (tmp_path / "retro_from_scratch_loss.png").stat().st_size > 0
    model, database = load_retro(tmp_path / "retro_from_scratch.pt")
    assert database["chunk_size"] == model.retro.chunk_size == 16
    plain = load_plain(tmp_path / "plain_from_scratch.pt")
    assert result["gpt_val_ppl"] == result["plain"]["ppl"] and plain.config == model.config
    assert set(result["retro"]) == {"retrieved", "off", "random"}


@pytest.mark.verifies(5, "A neighbour table from another database, a different k or chunk size, and a plain "
                         "checkpoint where a Retro one is expected (and the reverse) are refused with a clear error")
def test_bad_inputs_are_refused_with_clear_errors(quick_run, retrofit_run, tmp_path):
    from step5_retro import train_retro

    result, out = retrofit_run
    trained = load_checkpoint(out / "retro_retrofit.pt")["database"]
    with pytest.raises(UserError, match=r"another database .*tokenizer_sha"):
        check_database(trained, {**trained, "tokenizer_sha": "0123456789abcdef"}, "table.npz")
    with pytest.raises(UserError, match=r"another database .*embedder='model'"):
        check_database(trained, {**trained, "embedder": "model"}, "table.npz")
    retro = RetroConfig(chunk_size=4, k=2, cca_layers=[0])
    with pytest.raises(UserError, match=r"k=3 per chunk but this Retro model reads k=2"):
        check_neighbours(torch.zeros(1, 2, 3, 8, dtype=torch.long), retro, 8)
    with pytest.raises(UserError, match=r"12 tokens long but this Retro model's chunk size is 4"):
        check_neighbours(torch.zeros(1, 2, 2, 12, dtype=torch.long), retro, 8)
    with pytest.raises(UserError, match=r"plain model checkpoint where a Retro one is expected"):
        load_retro(quick_run.model)
    with pytest.raises(UserError, match=r"a Retro checkpoint where a plain model is expected"):
        load_plain(out / "retro_retrofit.pt")
    with pytest.raises(UserError, match=r"a Retro checkpoint where a plain model is expected"):
        train_retro.main(["--quick", "--retrofit", "--tokenizer", str(quick_run.tokenizer),
                          "--base", str(out / "retro_retrofit.pt"), "--out", str(tmp_path)])


def test_variants_keep_world_0_s_names_and_redraw_its_values():
    from common.world.world import LINKS, build_world
    from step5_retro.retro_data import REDRAWN, make_world

    base = build_world(0, "quick")
    variants = [make_world(seed, "variants", "quick") for seed in (1, 2)]
    for variant in variants:
        assert variant.entities == base.entities
        for old, new in zip(base.facts, variant.facts):
            assert (old.entity, old.relation) == (new.entity, new.relation)
            assert new.value in REDRAWN[new.relation] if new.relation in REDRAWN else new.value == old.value
            assert new.relation in REDRAWN or new.relation in LINKS
    changed = sum(o.value != n.value for o, n in zip(variants[0].facts, variants[1].facts))
    assert changed > len(base.facts) // 3  # two variants disagree on many values
