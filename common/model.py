"""The language model: a decoder-only transformer in one file.

    tokens -> embedding -> n_layer x Block -> RMSNorm -> lm_head -> logits

    Block:  x = x + attention(rmsnorm(x))          (pre-norm residual)
            x = x + cross_attn(rmsnorm(x), context) (only when step 5 plugs one in)
            x = x + feed_forward(rmsnorm(x))

The pieces are those of LLaMA-style models: RMSNorm, rotary position
embeddings (RoPE), grouped-query attention (GQA), a SwiGLU feed-forward, and
optional weight tying. Step 2 (step2_model/README.md) explains each one and
why it is there.

Usage:
    cfg = ModelConfig(vocab_size=512, block_size=128)
    model = Transformer(cfg)
    logits, loss = model(idx, targets)           # idx, targets: (B, T) int64
    out = model.eval().generate(prompt, 50, temperature=0.8, top_k=40)
    for token in model.generate_stream(prompt, 50): ...   # one token at a time

Extension points used by later steps (all without copying this file):
- step 4 (LoRA) replaces nn.Linear modules by name: attention `wq wk wv wo`,
  feed-forward `w_gate w_up w_down`. Every linear layer is an nn.Linear
  submodule called as a module, so swapping it swaps the computation.
- step 5 (Retro) plugs chunked cross-attention into chosen blocks with
  `Block.add_cross_attention(module)`; `model(idx, context=...)` hands
  `context` to it (see Block).
- step 6 (images) calls `model.embed(idx)`, overwrites the rows of image
  tokens, and passes `model(inputs_embeds=...)`.
- the optional Triton kernels (common/kernels/) take over RMSNorm.forward and
  `cross_entropy_loss` for CUDA tensors (`--kernels auto|triton|torch`); the
  PyTorch code here is what every other device runs.
"""
import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import kernels  # optional fused Triton kernels, used on CUDA only
from common.cli import UserError

IGNORE_INDEX = -100  # targets equal to this are not scored (prompt tokens, padding)


# ----------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    # defaults: the shape step 3 trains in its default profile; step 3 sets vocab_size from its tokenizer
    vocab_size: int = 4096      # what step 1 asks for; the world's tokenizer stops earlier (tok.vocab_size)
    block_size: int = 256       # longest sequence the model sees (context length)
    n_layer: int = 4
    n_head: int = 8             # query heads
    n_kv_head: int = 4          # key/value heads (GQA); == n_head is ordinary multi-head attention
    n_embd: int = 256           # width of the residual stream
    ffn_hidden: int = 0         # 0: the SwiGLU rule, see ffn_hidden_size()
    ffn_multiple_of: int = 32   # the rule rounds the hidden size up to a multiple of this
    dropout: float = 0.0
    tie_embeddings: bool = True  # lm_head shares its weight matrix with the token embedding
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    smear_keys: bool = False    # each key mixes in the previous token's key (Attention.smear_keys)

    def __post_init__(self):
        for f in fields(self):  # a hand-edited checkpoint must not smuggle in "4" or 4.5
            value = getattr(self, f.name)
            if not isinstance(value, _ACCEPTS[f.type]) or (f.type is not bool and isinstance(value, bool)):
                raise UserError(f"ModelConfig: {f.name}={value!r} should be of type {f.type.__name__}")
            setattr(self, f.name, f.type(value))  # numpy ints -> int, 1 -> 1.0
        problems = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_multiple_of"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.ffn_hidden < 0:
            problems.append(f"ffn_hidden={self.ffn_hidden} must be 0 (use the rule) or positive")
        if not problems:
            if self.n_embd % self.n_head:
                problems.append(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
            elif self.head_dim % 2:
                problems.append(f"head size n_embd/n_head={self.head_dim} must be even for rotary embeddings")
            if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
                problems.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            problems.append("rope_theta and norm_eps must be positive")
        if problems:
            raise UserError("ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def ffn_hidden_size(self) -> int:
        """SwiGLU has three matrices instead of two, so LLaMA shrinks the hidden
        size from 4*n_embd to 2/3 of that (same parameter count as a 4x GELU
        MLP), rounded up to a multiple of `ffn_multiple_of` for fast matmuls."""
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.n_embd / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    def to_dict(self) -> dict:
        """Plain dict (ints, floats, bools): what a checkpoint stores."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        """Build from a checkpoint's dict; unknown keys are an error, missing keys take the defaults."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: model config should be a dict, found {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{source}: unknown model config keys {unknown}; "
                            f"was it written by another version of common/model.py?")
        return cls(**d)


_ACCEPTS = {int: numbers.Integral, float: numbers.Real, bool: bool}  # field type -> values it takes
# The --quick model: step 3's quick profile on step 1's quick tokenizer (512 ids); step 2's scripts
# take it with --quick.
QUICK_CONFIG = ModelConfig(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain.
    Unlike LayerNorm it does not subtract the mean and has no bias: cheaper,
    and works as well in practice."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.is_cuda:  # the fused Triton kernel: the same numbers with less memory traffic
            return kernels.rms_norm(x, self.weight, self.eps)
        # x / sqrt(mean(x^2) + eps) * weight, with the mean of squares in float32 even when
        # the model runs in bf16. F.rms_norm is that formula as one operation.
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def rope_tables(head_dim: int, n_positions: int, theta: float = 10000.0):
    """cos and sin of the rotation angles, each (n_positions, head_dim), laid out for apply_rope.

    Channel pair i (channels i and i + head_dim/2) at position p is rotated by
    p * theta^(-2i/head_dim): fast rotations for the first pairs, slow ones for
    the last, like the hands of a clock. Both halves of a row hold the same
    angles; sin carries the minus sign of the first half's formula."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, head_dim) by its positions' angles (cos, sin: (T, head_dim)).

    Pair (x1, x2) = (x[i], x[i + head_dim/2]) becomes (x1 cos - x2 sin, x2 cos + x1 sin).
    Written as x * cos + (x with its halves swapped) * sin: three operations instead of
    eight, which on a CPU, where small models spend their time starting operations,
    is faster (step3_pretrain/EXPERIMENTS.md, "Where the time goes"). After rotating q at position m and k at
    position n, q.k depends on m - n only: attention sees relative positions."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin).type_as(x)


class KVCache:
    """Keys and values of the tokens already seen, for every layer.

    Without a cache, generating token t+1 recomputes keys and values of all t
    earlier tokens; with it, each step feeds only the new token. The memory is
    2 * n_layer * n_kv_head * head_dim numbers per token: GQA's smaller
    n_kv_head shrinks exactly this."""

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.last_raw_key = [None] * config.n_layer  # with smeared keys: each layer's last key before mixing
        self.length = 0  # tokens stored so far; the model advances it after each forward

    def update(self, layer: int, k, v):
        """Store new keys/values (B, n_kv_head, T, head_dim) after the cached ones; return all of them."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def kv_cache_bytes(config: ModelConfig, seq_len: int, batch_size: int = 1, bytes_per_value: int = 4) -> int:
    """Memory of a full KV cache: keys and values, every layer, every kv head."""
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * seq_len * batch_size * bytes_per_value


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and rotary positions.

    n_head query heads share n_kv_head key/value heads: each group of
    n_head // n_kv_head query heads reads the same keys and values."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.wq = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout
        # One learned share per key head, through a sigmoid: 0 starts every head half-smeared.
        self.smear = nn.Parameter(torch.zeros(config.n_kv_head)) if config.smear_keys else None

    def qkv(self, x, cos, sin, kv_cache=None):
        """Queries (B, n_head, T, hd), keys and values (B, n_kv_head, T, hd); q and k rotated.
        kv_cache: where smeared keys find the key before x's first token."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.smear is not None:
            before = kv_cache.last_raw_key[self.layer_idx] if kv_cache is not None and kv_cache.length else None
            if kv_cache is not None:
                kv_cache.last_raw_key[self.layer_idx] = k[:, :, -1:].clone()  # not a view of all of k
            k = self.smear_keys(k, before)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def smear_keys(self, k, before=None):
        """Smeared keys (Olsson et al. 2022, "In-context learning and induction heads"): key t becomes
        k[t] + sigmoid(a) * (k[t-1] - k[t]), one learned a per key head, before rotation. A query can
        then match "the token after an X" in one layer; a copy (induction) head needs that match,
        and otherwise has to build it from two layers. before: the key ahead of k's first (zeros at
        the start of a sequence)."""
        before = torch.zeros_like(k[:, :, :1]) if before is None else before
        previous = torch.cat([before, k[:, :, :-1]], dim=2)
        return torch.lerp(k, previous, torch.sigmoid(self.smear).view(1, -1, 1, 1).to(k.dtype))

    def expand_kv(self, t):
        """(B, n_kv_head, S, hd) -> (B, n_head, S, hd): kv head j serves query heads
        j*g ... j*g+g-1 (g = n_head // n_kv_head). The cache keeps the small tensor."""
        groups = self.n_head // self.n_kv_head
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin, kv_cache)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
        k, v = self.expand_kv(k), self.expand_kv(v)
        dropout_p = self.dropout if self.training else 0.0
        if past == 0:  # the whole sequence at once: the usual causal (lower-triangular) mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:  # new query i (absolute position past+i) sees every cached key and new keys up to itself
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.wo(y)

    def attention_probs(self, x, cos, sin):
        """softmax(QK^T / sqrt(hd)) with the causal mask, (B, n_head, T, T).
        Recomputed on demand for plots; the forward pass never builds it."""
        q, k, _ = self.qkv(x, cos, sin)
        scores = q @ self.expand_kv(k).transpose(-2, -1) / math.sqrt(self.head_dim)
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class FeedForward(nn.Module):
    """SwiGLU: down( silu(gate(x)) * up(x) ). The gate decides, per hidden
    unit, how much of up(x) passes -- a learned, smooth on/off switch."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ffn_hidden_size()
        self.w_gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.w_up = nn.Linear(config.n_embd, hidden, bias=False)
        self.w_down = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)))


class Block(nn.Module):
    """One transformer layer, pre-norm: each sub-layer reads a normalised copy
    of the residual stream and adds its result back, so the stream itself is
    never normalised and gradients flow straight down through the additions.

    Cross-attention slot (step 5): `cross_attn` is None by default. After
    `block.add_cross_attention(module)`, and when the model is called with
    `context=...`, the block computes, between self-attention and the
    feed-forward,
        x = x + module(cross_norm(x), context)
    where x is (B, T, n_embd) and `context` is passed through untouched (its
    format is the module's business). The module must return (B, T, n_embd).
    Called without context, the block skips it."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.cross_norm = None
        self.cross_attn = None
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = FeedForward(config)

    def add_cross_attention(self, module: nn.Module) -> None:
        """Plug a cross-attention module into this block, with its own fresh pre-norm."""
        self.cross_norm = RMSNorm(self.config.n_embd, self.config.norm_eps).to(self.ffn_norm.weight)
        self.cross_attn = module

    def forward(self, x, cos, sin, kv_cache=None, context=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, kv_cache))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.cross_norm(x), context)
        x = x + self.ffn(self.ffn_norm(x))
        return x


def cross_entropy_loss(logits, targets):
    """Mean next-token loss over the targets that are not IGNORE_INDEX.

    F.cross_entropy's own "mean" divides by the number of kept targets and
    gives 0/0 = NaN when every target is ignored (say, a batch that holds only
    prompts). Summing and dividing by max(count, 1) gives 0 instead, still
    attached to the graph so backward() works (with zero gradients)."""
    if logits.is_cuda:  # the fused Triton kernel never materialises the softmax
        return kernels.cross_entropy(logits, targets, IGNORE_INDEX)
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    n_scored = (targets != IGNORE_INDEX).sum()
    return loss_sum / n_scored.clamp(min=1)


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # RoPE has no parameters: the tables are buffers, not saved in checkpoints
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: each residual branch ends in a projection whose output is added
        # to the stream; 2 per layer, so scale them by 1/sqrt(2*n_layer) to keep
        # the stream's variance from growing with depth
        for block in self.blocks:
            for proj in (block.attn.wo, block.ffn.w_down):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.tie_embeddings:
            # one matrix maps token -> vector and vector -> token scores: fewer
            # parameters, and rare tokens get gradient from both ends
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):  # GPT-2: N(0, 0.02), no biases here
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_config_dict(cls, d: dict, source: str = "config") -> "Transformer":
        return cls(ModelConfig.from_dict(d, source))

    def embed(self, idx):
        """Token ids (B, T) -> vectors (B, T, n_embd). Step 6 edits these before forward."""
        return self.tok_emb(idx)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, context=None,
                kv_cache: KVCache | None = None, last_only: bool = False):
        """idx (B, T) token ids, or inputs_embeds (B, T, n_embd) -> (logits, loss).

        targets (B, T): the next token at each position, IGNORE_INDEX where not
        scored; loss is None without targets. last_only: logits for the last
        position only, (B, 1, vocab) -- all that generation needs, and it skips
        the biggest matmul for the other T-1 positions. kv_cache: the positions
        continue after the cached tokens, which the new ones attend to.
        context: handed to the cross-attention slots (step 5)."""
        if (idx is None) == (inputs_embeds is None):
            raise UserError("Transformer.forward: pass exactly one of idx and inputs_embeds")
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds
        T = x.size(1)
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise UserError(f"Transformer.forward: {start + T} positions but block_size is "
                            f"{self.config.block_size}; crop the input to its last {self.config.block_size} tokens")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, context)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.norm(x)
        if last_only:
            if targets is not None:
                raise UserError("Transformer.forward: last_only=True cannot compute a loss")
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None if targets is None else cross_entropy_loss(logits, targets)
        return logits, loss

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, stop_tokens=(), use_cache: bool = True, generator=None,
                        allowed=None):
        """Yield the next tokens one at a time, each a (B,) LongTensor.

        idx: (B, T) prompt. temperature 0 means greedy (argmax). allowed: a
        (vocab,) or (B, vocab) bool mask, the only tokens that may be written
        (constrained decoding; None: any token). stop_tokens:
        token ids (an int or a list); generation ends once every row has
        produced one (the stop token is yielded; a row that stopped repeats it
        while the others go on), or after max_new_tokens. Call model.eval()
        first so dropout is off.

        Context longer than block_size: without the cache the model sees the
        last block_size tokens at every step. With the cache, when it is full
        it is rebuilt from the last block_size // 2 tokens: the window cannot
        slide by one, because the cached keys and values of layers above the
        first were computed while the oldest token was still visible. So past
        block_size the two modes see different windows; up to it they agree."""
        check_sampling_args(temperature, top_k, top_p)
        if isinstance(stop_tokens, int):
            stop_tokens = [stop_tokens]
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=idx.device)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        if allowed is not None:
            allowed = allowed.to(idx.device)
        block_size, cache, seq = self.config.block_size, None, idx
        pending = seq  # tokens the model has not read yet
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(seq[:, -block_size:], last_only=True)
            else:
                if cache is None or cache.length + pending.size(1) > block_size:
                    keep = block_size if cache is None else max(1, block_size // 2)
                    cache = KVCache(self.config, seq.size(0), seq.device, self.lm_head.weight.dtype)
                    pending = seq[:, -keep:]
                logits, _ = self(pending, kv_cache=cache, last_only=True)
            logits = logits[:, -1, :]
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if len(stop):
                token = torch.where(finished, seq[:, -1], token)
                finished |= torch.isin(token, stop)
            seq = torch.cat([seq, token[:, None]], dim=1)
            pending = token[:, None]
            yield token
            if len(stop) and bool(finished.all()):
                return

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, **kwargs):
        """Prompt (B, T) -> (B, T + new) with the generated tokens appended; same
        arguments as generate_stream."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def check_sampling_args(temperature, top_k, top_p) -> None:
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be at least 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} must be in (0, 1]")


def next_token_probs(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """(B, vocab) logits -> (B, vocab) probabilities after temperature, top-k and top-p.

    temperature < 1 sharpens, > 1 flattens. top_k keeps the k likeliest
    tokens. top_p (nucleus) keeps the smallest set of likeliest tokens whose
    probabilities add up to at least p."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs[mass_before >= top_p] = 0.0  # the set already reached p without them
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, vocab) logits -> (B,) token ids. temperature 0: argmax (greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
