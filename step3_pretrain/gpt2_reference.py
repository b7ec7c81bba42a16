"""The GPT-2 architecture nanoGPT trains, so bench_throughput.py can time it beside ours.

nanoGPT's model (with the CPU recipe's bias=False and dropout 0): learned position
embeddings, LayerNorm, one product for q, k and v, causal scaled-dot-product attention,
a 4x-wide GELU MLP and an output head tied to the token embedding. Timing it in the same
process as ours, round after round, evens out the drift of a CPU's speed between the two.
It is a timing reference, not part of the course's model: that is common/model.py. What does
not change the time is left out: nanoGPT's weight initialisation (PyTorch's default here) and
its dropout layers (at p=0 they hand their input through).
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("step3_pretrain/gpt2_reference.py is a module, not a script: "
                     "step3_pretrain/bench_throughput.py --against_gpt2 uses it")

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)  # q, k, v in one product
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 n_kv_head: int | None = None):  # n_kv_head: nanoGPT has no grouped-query attention
        if n_kv_head not in (None, n_head):
            raise ValueError("nanoGPT's attention has as many key/value heads as query heads")
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as in nanoGPT

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def nanogpt_optimizer(model: nn.Module, lr: float = 1e-3, fused: bool = False) -> torch.optim.AdamW:
    """What nanoGPT's train.py builds on a CPU for the Shakespeare recipe: weight decay 0.1 on
    matrices only, betas (0.9, 0.99), and PyTorch's per-tensor AdamW: nanoGPT asks for the fused
    one only on CUDA. Ours uses the fused one on a CPU too; fused=True gives nanoGPT's model the
    same, to compare the architectures alone."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=fused)
