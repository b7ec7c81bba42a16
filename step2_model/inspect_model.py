"""Looking inside the model: attention maps, how spread attention is, and where the parameters are.

Step 2 teaches these; later steps import them from here (step 4's evaluation reports attention entropy).

    maps = attention_maps(model, idx)        # per layer: (B, n_head, T, T), row i = what position i reads
    counts = count_parameters(model)         # measured, by part
    trainable, total = count_trainable(model)  # any module: what trains, and everything
    formula = param_formula(model.config)    # the same counts from the config alone
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("step2_model/inspect_model.py is a module, not a script: "
                     "step2_model/param_count.py and step2_model/attention_map.py use it")

import torch

from common.model import ModelConfig, Transformer


@torch.no_grad()
def attention_maps(model: Transformer, idx) -> list:
    """Attention weights of every layer for token ids idx (B, T): a list of
    n_layer tensors (B, n_head, T, T), row i = how much position i reads each
    earlier position. One extra pass; the normal forward stays untouched."""
    T = idx.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x, maps = model.embed(idx), []
    for block in model.blocks:
        maps.append(block.attn.attention_probs(block.attn_norm(x), cos, sin))
        x = block(x, cos, sin)
    return maps


@torch.no_grad()
def attention_entropy(model: Transformer, idx) -> list[float]:
    """Mean entropy, in nats, of each layer's attention rows for token ids idx (B, T): how
    spread out attention is. A row that reads n tokens evenly has entropy log(n); a row that
    reads a single token has 0. Falling towards 0 across the board is "attention entropy
    collapse", a known way for training to go wrong (step4_sft/EXPERIMENTS.md, attention collapses)."""
    return [float(-(w * w.clamp_min(1e-12).log()).sum(-1).mean()) for w in attention_maps(model, idx)]


def count_parameters(model: Transformer) -> dict:
    """Measured parameter counts by part; a tied lm_head counts 0 (it is the embedding)."""
    parts = {"embedding": 0, "attention": 0, "ffn": 0, "norms": 0, "lm_head": 0, "other": 0}
    seen = set()
    for name, p in model.named_parameters():  # named_parameters lists a shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("tok_emb."):
            part = "embedding"
        elif name.startswith("lm_head."):
            part = "lm_head"
        elif ".attn." in name:
            part = "attention"
        elif ".ffn." in name:
            part = "ffn"
        elif name.endswith("norm.weight"):
            part = "norms"
        else:
            part = "other"  # e.g. step 5's cross-attention modules
        parts[part] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def param_formula(config: ModelConfig) -> dict:
    """The same counts from the config alone (V vocab, C n_embd, L n_layer,
    d head_dim, H ffn hidden):
      embedding  V*C
      attention  L * (C*n_head*d [wq] + 2*C*n_kv_head*d [wk, wv] + n_head*d*C [wo]),
                 plus L * n_kv_head with smeared keys (one share per key head)
      ffn        L * 3*C*H        (w_gate, w_up, w_down)
      norms      (2*L + 1) * C    (two per block and the final one)
      lm_head    V*C, or 0 when tied to the embedding"""
    V, C, L, d, H = config.vocab_size, config.n_embd, config.n_layer, config.head_dim, config.ffn_hidden_size()
    parts = {
        "embedding": V * C,
        "attention": L * (2 * C * config.n_head * d + 2 * C * config.n_kv_head * d
                          + (config.n_kv_head if config.smear_keys else 0)),
        "ffn": L * 3 * C * H,
        "norms": (2 * L + 1) * C,
        "lm_head": 0 if config.tie_embeddings else V * C,
        "other": 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of any module; a tied weight counts once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
