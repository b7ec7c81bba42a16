"""Step 2: the transformer (common/model.py) and the scripts that look inside it."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common.paths
from common.checkpoint import checkpoint_dict, load_model, save_checkpoint
from common.cli import UserError
from common.model import (Attention, KVCache, ModelConfig, Transformer, apply_rope, kv_cache_bytes, next_token_probs,
                          rope_tables)
from step2_model.inspect_model import attention_entropy, attention_maps, count_parameters, param_formula

# Small but complete: GQA (4 query heads share 2 kv heads), 2 layers, tied embeddings.
TINY = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(replace(TINY, **overrides)).eval()
    # GPT-2's init (std 0.02) makes nearly uniform attention and logits; larger weights make
    # the comparisons below sensitive to any mistake in masking, positions or head grouping.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """Scripts write under out/: point out/ at a temporary folder."""
    monkeypatch.setattr(common.paths, "OUT_DIR", tmp_path / "out")
    return tmp_path / "out"


# ----------------------------------------------------------------------------- verification list

@pytest.mark.verifies(2, "parameter count equals the formula")
@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 4}, {"n_kv_head": 1, "tie_embeddings": False},
                                       {"ffn_hidden": 50, "n_layer": 3}])
def test_parameter_count_equals_formula(overrides):
    cfg = replace(TINY, **overrides)
    model = Transformer(cfg)
    measured = count_parameters(model)
    assert measured == param_formula(cfg)
    assert measured["total"] == sum(p.numel() for p in model.parameters())  # shared weights once
    if not overrides:
        # by hand: V=97, C=32, L=2, d=8, H=ceil(int(8*32/3)=85 to a multiple of 32)=96
        assert cfg.ffn_hidden_size() == 96
        assert measured == {"embedding": 97 * 32, "attention": 2 * (2 * 32 * 4 * 8 + 2 * 32 * 2 * 8),
                            "ffn": 2 * 3 * 32 * 96, "norms": 5 * 32, "lm_head": 0, "other": 0,
                            "total": 3104 + 6144 + 18432 + 160}


@pytest.mark.verifies(2, "changing token t+1 never changes logits at positions <= t")
def test_changing_a_later_token_never_changes_earlier_logits():
    model = tiny_model()
    torch.manual_seed(1)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    base, _ = model(idx)
    for t in range(15):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 + t) % TINY.vocab_size
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
        assert (logits[:, t + 1] - base[:, t + 1]).abs().max() > 1e-3  # position t+1 does see it


@pytest.mark.verifies(2, "generation with the KV cache gives the same logits (to float tolerance) "
                         "and the same greedy tokens as without it")
def test_kv_cache_gives_same_logits_and_greedy_tokens():
    model = tiny_model()
    torch.manual_seed(2)
    idx = torch.randint(0, TINY.vocab_size, (2, 24))
    full, _ = model(idx)
    cache = KVCache(model.config, batch_size=2)
    pieces = [model(idx[:, :7], kv_cache=cache)[0],      # the prompt
              model(idx[:, 7:11], kv_cache=cache)[0]]    # several new tokens at once: offset causal mask
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(11, 24)]  # one at a time
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)

    prompt = idx[:, :5]
    with_cache = model.generate(prompt, 27, temperature=0.0, use_cache=True)   # fills the block exactly
    without = model.generate(prompt, 27, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, 32)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[0, 5:].tolist())) > 1  # not a degenerate one-token answer
    # greedy = argmax of the full forward at each step
    logits, _ = model(with_cache[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(dim=-1), with_cache[:, 5:])


@pytest.mark.verifies(2, "GQA with n_kv_heads == n_heads equals plain multi-head attention")
def test_gqa_with_as_many_kv_heads_as_heads_is_plain_multi_head_attention():
    torch.manual_seed(3)
    cfg = replace(TINY, n_kv_head=4)
    attn = Attention(cfg, layer_idx=0).eval()
    B, T, C, H, d = 2, 10, 32, 4, 8
    x = torch.randn(B, T, C)
    with torch.no_grad():
        out = attn(x, *rope_tables(d, T))
        expected = plain_multi_head_attention(attn, x, H, d)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


def plain_multi_head_attention(attn, x, H, d):
    """Causal multi-head attention written independently of common/model.py: complex-number
    RoPE, a loop over heads and query positions, and the softmax by hand, in float64."""
    B, T, _ = x.shape

    def rope(t):  # t (T, d): channel pairs (i, i + d/2) rotate by angle pos * 10000^(-2i/d)
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        z = torch.complex(t[:, :d // 2].double(), t[:, d // 2:].double()) * torch.polar(
            torch.ones(T, d // 2, dtype=torch.float64), pos * freqs)
        return torch.cat([z.real, z.imag], dim=-1)

    q_all, k_all, v_all = (x @ attn.wq.weight.T, x @ attn.wk.weight.T, x @ attn.wv.weight.T)
    heads = torch.zeros(B, T, H * d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            cols = slice(h * d, (h + 1) * d)
            q, k, v = rope(q_all[b, :, cols]), rope(k_all[b, :, cols]), v_all[b, :, cols].double()
            for i in range(T):
                scores = torch.tensor([q[i] @ k[j] / math.sqrt(d) for j in range(i + 1)])  # keys 0..i only
                weights = scores.exp() / scores.exp().sum()
                heads[b, i, cols] = weights @ v[:i + 1]
    return heads @ attn.wo.weight.double().T


@pytest.mark.verifies(2, "RoPE makes the query-key score depend only on the relative distance")
def test_rope_score_depends_only_on_relative_distance():
    torch.manual_seed(4)
    d, n_pos = 16, 64
    cos, sin = rope_tables(d, n_pos)
    q, k = torch.randn(d), torch.randn(d)
    q_at = apply_rope(q.expand(1, 1, n_pos, d), cos, sin)[0, 0]  # q_at[m] = q rotated to position m
    k_at = apply_rope(k.expand(1, 1, n_pos, d), cos, sin)[0, 0]

    def score(m, n):
        return (q_at[m] @ k_at[n]).item()

    for distance in (0, 1, 7, 20):
        same_distance = [score(n + distance, n) for n in (0, 3, 17, 40)]
        assert max(same_distance) - min(same_distance) < 1e-4, (distance, same_distance)
    assert abs(score(5, 0) - score(6, 0)) > 1e-3  # ...and it does depend on the distance
    assert abs(score(0, 0) - (q @ k).item()) < 1e-5  # distance 0: no rotation left


@pytest.mark.verifies(2, "all-ignored targets give a loss of 0, not NaN")
def test_all_ignored_targets_give_zero_loss_with_a_gradient_path():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    _, loss = model(idx, torch.full_like(idx, -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(model.tok_emb.weight.grad, torch.zeros_like(model.tok_emb.weight))
    # and with some targets kept: the mean over exactly those
    targets = torch.randint(0, TINY.vocab_size, (2, 8))
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))


@pytest.mark.verifies(2, "inputs_embeds gives the same logits as token ids")
def test_inputs_embeds_equal_token_ids():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    by_ids, _ = model(idx)
    embeds = model.embed(idx)
    assert embeds.shape == (2, 12, 32)
    by_embeds, _ = model(inputs_embeds=embeds)
    assert torch.equal(by_embeds, by_ids)
    # step 6 overwrites some rows: positions before the first edited one are unchanged
    edited = embeds.clone()
    edited[:, 6] = torch.randn(2, 32)
    logits, _ = model(inputs_embeds=edited)
    assert torch.equal(logits[:, :6], by_ids[:, :6])
    assert not torch.allclose(logits[:, 6:], by_ids[:, 6:])
    with pytest.raises(UserError):
        model(idx, inputs_embeds=embeds)


class RecordingCrossAttention(nn.Module):
    """Stands in for step 5's chunked cross-attention: records its inputs, adds a fixed vector."""

    def __init__(self, dim):
        super().__init__()
        self.calls = []
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x, context):
        self.calls.append((x.detach().clone(), context))
        return self.bias.expand_as(x)


@pytest.mark.verifies(2, "the cross-attention slot is called when context is passed")
def test_cross_attention_slot_is_called_with_normed_input_and_context():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    base, _ = model(idx)
    assert all(block.cross_attn is None for block in model.blocks)
    slot = RecordingCrossAttention(32)
    model.blocks[1].add_cross_attention(slot)
    context = {"neighbours": torch.arange(6)}
    same, _ = model(idx, context=context)
    assert len(slot.calls) == 1 and slot.calls[0][1] is context
    x = slot.calls[0][0]
    assert x.shape == (2, 8, 32)
    torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(2, 8), atol=1e-4, rtol=0)  # pre-normed
    torch.testing.assert_close(same, base)  # the slot added zeros
    with torch.no_grad():
        slot.bias.fill_(0.5)
    moved, _ = model(idx, context=context)
    assert not torch.allclose(moved, base)
    skipped, _ = model(idx)  # without context the slot is skipped
    assert len(slot.calls) == 2 and torch.equal(skipped, base)
    assert count_parameters(model)["other"] == 32  # the slot's parameters are counted apart


@pytest.mark.verifies(2, "load_model rejects a checkpoint made for a different config")
def test_load_model_rejects_a_mismatched_config(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.pt"
    save_checkpoint(checkpoint_dict(model), path)
    loaded = load_model(path)
    idx = torch.randint(0, TINY.vocab_size, (1, 8))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # still tied after loading

    with pytest.raises(UserError, match=r"model\.pt: this checkpoint was made for a different model config: "
                                        r"n_embd=32 there but 64 here"):
        load_model(path, config=replace(TINY, n_embd=64))
    # config and weights that disagree inside one file
    bad = checkpoint_dict(model)
    bad["config"]["n_layer"] = 3
    save_checkpoint(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="different model config: missing"):
        load_model(tmp_path / "bad.pt")
    bad = checkpoint_dict(model)
    bad["config"]["vocab_size"] = 100
    save_checkpoint(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"tok_emb\.weight is \(97, 32\) there but \(100, 32\) here"):
        load_model(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- more of the model

def test_config_validation_is_a_clear_user_error():
    with pytest.raises(UserError, match="n_embd=30 must be a multiple of n_head=4"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(UserError, match="n_kv_head=3 must divide n_head=4"):
        ModelConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(UserError, match="head size .* must be even"):
        ModelConfig(n_head=4, n_kv_head=4, n_embd=12)
    with pytest.raises(UserError, match=r"n_layer='4' should be of type int"):
        ModelConfig(n_layer="4")
    with pytest.raises(UserError, match=r"ck\.pt: unknown model config keys \['n_heads'\]"):
        Transformer.from_config_dict({**TINY.to_dict(), "n_heads": 4}, source="ck.pt")
    model = Transformer.from_config_dict(TINY.to_dict())
    assert model.config == TINY and model.config.to_dict()["n_kv_head"] == 2


def test_weights_start_as_in_gpt2_with_scaled_residual_projections():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, block_size=16, n_layer=8, n_head=4, n_kv_head=4, n_embd=64))
    residual_std = 0.02 / math.sqrt(2 * 8)  # = 0.005: two residual branches per layer, 8 layers
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = residual_std if name.endswith(("attn.wo.weight", "ffn.w_down.weight")) else 0.02
            assert abs(p.std().item() / want - 1) < 0.1 and abs(p.mean().item()) < want / 10, name
    assert model.lm_head.weight is model.tok_emb.weight
    untied = Transformer(replace(TINY, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_every_linear_is_a_named_nn_linear_submodule_so_lora_can_replace_it():
    model = tiny_model()
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {f"blocks.{i}.{n}" for i in range(2) for n in
                ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w_gate", "ffn.w_up", "ffn.w_down")}
    assert linears == expected | {"lm_head"}
    idx = torch.randint(0, TINY.vocab_size, (1, 6))
    base, _ = model(idx)

    class Shifted(nn.Module):  # what a LoRA wrapper does: base(x) + something
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) + 0.1

    for name in ("wq", "wv"):
        setattr(model.blocks[0].attn, name, Shifted(getattr(model.blocks[0].attn, name)))
    model.blocks[1].ffn.w_down = Shifted(model.blocks[1].ffn.w_down)
    assert not torch.allclose(model(idx)[0], base)


def test_gqa_groups_query_heads_onto_shared_kv_heads():
    """A GQA model equals the multi-head model whose k/v heads are copies of the shared ones."""
    gqa = tiny_model(n_kv_head=2)
    mha = Transformer(replace(TINY, n_kv_head=4)).eval()
    state = gqa.state_dict()
    for i in range(TINY.n_layer):
        for w in ("wk", "wv"):  # kv head j serves query heads 2j and 2j+1
            heads = state[f"blocks.{i}.attn.{w}.weight"].view(2, 8, 32)
            state[f"blocks.{i}.attn.{w}.weight"] = heads.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], atol=1e-5, rtol=1e-5)
    assert kv_cache_bytes(gqa.config, 32) * 2 == kv_cache_bytes(mha.config, 32) == 2 * 2 * 4 * 8 * 32 * 4


def test_attention_maps_are_causal_distributions_that_reproduce_the_forward():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (1, 9))
    maps = attention_maps(model, idx)
    assert len(maps) == 2 and maps[0].shape == (1, 4, 9, 9)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(1, 4, 9))
        assert torch.equal(m.triu(diagonal=1), torch.zeros_like(m))
    # weights @ values, through wo, is what layer 0's attention computes in the forward pass
    block = model.blocks[0]
    x = block.attn_norm(model.embed(idx))
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    _, _, v = block.attn.qkv(x, cos, sin)
    y = (maps[0] @ block.attn.expand_kv(v)).transpose(1, 2).reshape(1, 9, 32)
    torch.testing.assert_close(block.attn.wo(y), block.attn(x, cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.verifies(2, "attention entropy is log n for a row that reads n tokens evenly, "
                         "and near 0 when one key dominates")
def test_attention_entropy_is_log_n_for_even_attention_and_falls_when_one_key_dominates():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.wq.weight.zero_()  # every score 0: position i reads its i + 1 tokens evenly
    even = sum(math.log(i + 1) for i in range(9)) / 9
    assert attention_entropy(model, idx) == pytest.approx([even, even], abs=1e-5)
    with torch.no_grad():  # each query head = 1000 x its key head: large scores, one key wins each row
        for block in model.blocks:
            per_kv_head = block.attn.wk.weight.view(TINY.n_kv_head, -1, TINY.n_embd)
            per_query_head = per_kv_head.repeat_interleave(TINY.n_head // TINY.n_kv_head, dim=0)
            block.attn.wq.weight.copy_(1000 * per_query_head.reshape(-1, TINY.n_embd))
    assert max(attention_entropy(model, idx)) < 0.05


def test_sampling_filters_exactly():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    torch.testing.assert_close(next_token_probs(logits), torch.tensor([[0.5, 0.3, 0.2]]))
    torch.testing.assert_close(next_token_probs(logits, top_p=0.7), torch.tensor([[0.625, 0.375, 0.0]]))
    torch.testing.assert_close(next_token_probs(logits, top_p=0.5), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(next_token_probs(logits, top_k=2), torch.tensor([[0.625, 0.375, 0.0]]))
    sharp = next_token_probs(logits, temperature=0.5)  # p^2, renormalised
    torch.testing.assert_close(sharp, torch.tensor([[0.25, 0.09, 0.04]]) / 0.38)
    model = tiny_model()
    with pytest.raises(UserError, match="top_p"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, top_p=1.5)


def test_sampling_with_a_seeded_generator_is_reproducible_and_respects_top_k():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (3, 4))
    runs = [model.generate(prompt, 10, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    logits, _ = model(runs[0][:, :-1])
    allowed = logits[:, 3:].topk(3, dim=-1).indices  # the 3 likeliest tokens at each step
    assert (allowed == runs[0][:, 4:, None]).any(-1).all()


def test_stop_tokens_end_generation_and_stream_yields_the_same_tokens():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (1, 4))
    free = model.generate(prompt, 20, temperature=0.0)[0, 4:].tolist()
    stop = free[3]
    first = free.index(stop)
    stopped = model.generate(prompt, 20, temperature=0.0, stop_tokens=[stop])[0, 4:].tolist()
    assert stopped == free[:first + 1]  # up to and including the stop token
    streamed = [t.item() for t in model.generate_stream(prompt, 20, temperature=0.0, stop_tokens=[stop])]
    assert streamed == stopped


@pytest.mark.verifies(2, "with smeared keys, the KV cache gives the same logits and greedy tokens as the full "
                         "forward, a share of 0 is the plain model and a share of 1 hands each position the "
                         "previous token's key")
def test_smeared_keys_cache_and_limits():
    model = tiny_model(smear_keys=True)
    with torch.no_grad():  # a different share for every key head, so a head mixed up shows
        for block in model.blocks:
            block.attn.smear.normal_(0.0, 2.0)
    torch.manual_seed(4)
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    full, _ = model(idx)
    cache = KVCache(model.config, batch_size=2)
    pieces = [model(idx[:, :6], kv_cache=cache)[0], model(idx[:, 6:9], kv_cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    prompt = idx[:, :4]
    assert torch.equal(model.generate(prompt, 20, temperature=0.0, use_cache=True),
                       model.generate(prompt, 20, temperature=0.0, use_cache=False))

    plain = tiny_model()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".smear")}
    plain.load_state_dict(state)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.smear.fill_(-1e4)  # sigmoid: exactly 0
    assert torch.equal(model(idx)[0], plain(idx)[0])
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.smear.fill_(1e4)  # sigmoid: exactly 1
    k = torch.randn(2, TINY.n_kv_head, 5, TINY.head_dim)
    shifted = attn.smear_keys(k)
    assert torch.equal(shifted[:, :, 1:], k[:, :, :-1]) and not shifted[:, :, 0].any()
    counts = count_parameters(model)
    assert counts["attention"] == param_formula(model.config)["attention"]


def test_allowed_mask_writes_only_allowed_tokens_and_an_all_true_mask_changes_nothing():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (2, 4))
    free = model.generate(prompt, 12, temperature=0.0)
    assert torch.equal(model.generate(prompt, 12, temperature=0.0,
                                      allowed=torch.ones(TINY.vocab_size, dtype=torch.bool)), free)
    allowed = torch.zeros(TINY.vocab_size, dtype=torch.bool)
    allowed[torch.arange(1, TINY.vocab_size, 7)] = True
    allowed[free[0, 4]] = False  # the first free choice of row 0 is ruled out
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "generator": torch.Generator().manual_seed(3)}):
        out = model.generate(prompt, 12, allowed=allowed, **kwargs)
        assert allowed[out[:, 4:]].all()
    greedy = model.generate(prompt, 12, temperature=0.0, allowed=allowed)
    logits, _ = model(greedy[:, :-1])  # greedy = argmax over the allowed tokens at each step
    assert torch.equal(logits[:, 3:].masked_fill(~allowed, float("-inf")).argmax(-1), greedy[:, 4:])


def test_generation_past_the_block_size_keeps_going():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (2, 40))  # longer than block_size 32: cropped
    for use_cache in (True, False):
        out = model.generate(prompt, 50, temperature=0.0, use_cache=use_cache)
        assert out.shape == (2, 90) and torch.equal(out[:, :40], prompt)
    with pytest.raises(UserError, match="block_size is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


# ----------------------------------------------------------------------------- the scripts

def test_param_count_script_prints_formula_beside_measured(out_dir, capsys):
    from step2_model import param_count
    result = param_count.main(["--vocab_size", "97", "--block_size", "32", "--n_layer", "2", "--n_head", "4",
                               "--n_kv_head", "2", "--n_embd", "32"])
    assert result["formula"] == result["measured"] and result["measured"]["total"] == 27840
    assert result["mha_attention"] == 2 * 4 * 32 * 32 and result["untied_total"] == 27840 + 97 * 32
    text = capsys.readouterr().out
    assert "L*3*C*H = 2*3*32*96" in text and "18,432" in text
    metrics = json.loads((out_dir / "step2" / "metrics.json").read_text())
    assert metrics["params"]["total"] == 27840 and metrics["params"]["formula_matches"] is True


def test_attention_map_script_falls_back_to_a_random_model_and_bytes(out_dir, capsys):
    from step2_model import attention_map
    quick_dir = out_dir / "quick"  # where --quick reads and writes
    (quick_dir / "step3").mkdir(parents=True)
    (quick_dir / "step3" / "model.pt").write_bytes(b"not a checkpoint")  # a broken file must not crash it
    result = attention_map.main(["--quick", "--text", "héllo world"])
    printed = capsys.readouterr().out
    assert not result["trained"] and "RANDOMLY INITIALISED" in printed and "could not load" in printed
    assert "byte-level fallback" in printed
    assert result["n_tokens"] == len("héllo world".encode("utf-8"))
    assert Path(result["path"]) == quick_dir / "step2" / "attention_map.png" and Path(result["path"]).stat().st_size
    assert len(result["maps"]) == 2
    with pytest.raises(UserError, match="--layer 5"):
        attention_map.main(["--quick", "--layer", "5"])


def test_attention_map_script_uses_a_trained_checkpoint_and_tokenizer(out_dir, tmp_path):
    from step1_tokenizer.bpe import train_bpe
    from step2_model import attention_map
    tok = train_bpe(["the cat sat on the mat. the cat ate the rat."] * 3, vocab_size=256 + 4 + 20)
    tok.save(out_dir / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(replace(TINY, vocab_size=tok.vocab_size))
    save_checkpoint(checkpoint_dict(model), out_dir / "step3" / "model.pt")
    text = "the cat sat on the mat"
    result = attention_map.main(["--text", text, "--layer", "1", "--out", str(tmp_path / "a.png")])
    assert result["trained"] and result["n_tokens"] == len(tok.encode(text))
    assert (tmp_path / "a.png").stat().st_size > 0
    torch.testing.assert_close(result["maps"][1], attention_maps(model.eval(), torch.tensor([tok.encode(text)]))[1])


def test_kv_cache_bench_reports_both_speeds_and_same_tokens(out_dir):
    from common.model import QUICK_CONFIG
    from step2_model import kv_cache_bench
    result = kv_cache_bench.main(["--quick", "--new_tokens", "12"])
    assert result["same_tokens"] is True
    assert result["tokens_per_sec_with_cache"] > 0 and result["tokens_per_sec_without_cache"] > 0
    memory = list(result["kv_cache_memory"].values())
    T = QUICK_CONFIG.block_size  # layers * (k and v) * kv heads * head dim * tokens * 4 bytes
    assert memory[0] == {"gqa_bytes": 2 * 2 * 2 * 16 * T * 4, "mha_bytes": 2 * 2 * 4 * 16 * T * 4}
    assert memory[1]["mha_bytes"] == 8 * memory[1]["gqa_bytes"]
    quick_dir = out_dir / "quick" / "step2"  # where a --quick run writes
    metrics = json.loads((quick_dir / "metrics.json").read_text())
    assert metrics["kv_cache"]["same_tokens"] is True and (quick_dir / "kv_cache.png").exists()
    with pytest.raises(UserError, match="does not fit"):
        kv_cache_bench.main(["--quick", "--new_tokens", str(T)])  # the 8-token prompt leaves no room for T more


def test_causality_check_script_finds_no_leak():
    from step2_model import causality_check
    result = causality_check.main(["--quick", "--tokens", "8"])
    assert result["causal"] and result["worst_before"] == 0.0 and len(result["rows"]) == 7


def test_notebook_runs():
    from tests.notebooks import has_image, outputs_text, run_notebook

    notebook = run_notebook("step2_model/step2_model.ipynb", timeout=180)
    outputs = outputs_text(notebook)
    assert "embedding" in outputs and "total" in outputs
    assert "the same output: True" in outputs  # attention computed by hand, head by head, is the module's
    assert has_image(notebook)
