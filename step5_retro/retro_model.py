"""Retro: a decoder that reads retrieved neighbours through chunked cross-attention (CCA).

    input (B, T) split into chunks of m tokens; for chunk u, k neighbours, each the retrieved chunk
    plus its continuation (r = 2m tokens): neighbours (B, L, k, r), L = T // m

    neighbour tokens --embed--> encoder (bidirectional, conditioned on the decoder's chunk u)
                                  --> memory (B, L, k*r, C)
    decoder block with CCA:  x = x + attn(...);  x = x + tanh(alpha) * CCA(cross_norm(x), memory);  x = x + ffn(...)

The decoder is the common model (common/model.py), unchanged: CCA modules are plugged into chosen
blocks through `Block.add_cross_attention`, and the neighbours travel as the `context` argument
of its forward pass. Nothing of the decoder is copied here.

Causality (RETRO, and Megatron-LM's `decoder_attention.py`): the neighbours of chunk u were
retrieved with chunk u's tokens, so only positions that have read all of chunk u may see them.
CCA shifts the sequence left by m-1: positions from the last token of chunk u to the
second-to-last token of chunk u+1 attend to chunk u's neighbours; the first m-1 positions attend
to none.

The gate: CCA's output is multiplied by tanh(alpha), alpha a learned scalar. A RETRO-fitted model
must start as exactly its base model, and there are two ways to make CCA add nothing at first:
alpha = 0 (the gate shut), or CCA's output projection at zero with the gate open (zero_output, as
LoRA zero-initialises B and ControlNet its zero convolutions). With the gate shut no CCA weight gets
a gradient, and the gate's own gradient is noise; with the projection at zero the projection learns
from the first step (its input, the attention output, is not zero), and the rest of CCA from the next.

Usage:
    decoder = Transformer(ModelConfig(...))            # or common.model.load_model(...) to RETRO-fit
    model = RetroModel(decoder, RetroConfig(chunk_size=32, k=2, cca_layers=[1, 3]))
    logits, loss = model(idx, targets, neighbours=nb)  # nb: (B, T // 32, 2, 64) token ids, NO_TOKEN = padding
    logits, loss = model(idx, targets)                 # retrieval off: the decoder alone
"""
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_checkpoint, load_weights, model_from_checkpoint
from common.cli import UserError, next_command
from common.model import Attention, FeedForward, ModelConfig, RMSNorm, Transformer, rope_tables

NO_TOKEN = -1  # a neighbour position that holds nothing (a chunk's continuation past its document's end)
MAKE_RETRO = "python step5_retro/train_retro.py"
MAKE_BASE = "python step3_pretrain/train_pretrain.py"


@dataclass
class RetroConfig:
    chunk_size: int = 32         # m: tokens per chunk, in the input and in the database
    k: int = 2                   # neighbours per chunk
    cca_layers: list = field(default_factory=lambda: [1, 3])  # decoder blocks that get CCA (0-based)
    encoder_layers: int = 2      # bidirectional blocks over each neighbour
    condition: bool = True       # the encoder reads the decoder's chunk (RETRO); False: each distinct
                                 # neighbour is encoded once per batch, however many chunks retrieved it
    gate_init: float = 0.0       # alpha at the start: 0 = gate shut; 2 = open (tanh 2 = 0.96)
    zero_output: bool = False    # CCA's output projection starts at zero: the model starts as its decoder
                                 # with the gate open (RETRO-fitting)

    def __post_init__(self):
        self.cca_layers = [int(i) for i in self.cca_layers]
        problems = [f"{name}={getattr(self, name)} must be at least 1"
                    for name in ("chunk_size", "k", "encoder_layers") if int(getattr(self, name)) < 1]
        if not self.cca_layers or sorted(set(self.cca_layers)) != self.cca_layers:
            problems.append(f"cca_layers={self.cca_layers} must be distinct layer numbers in increasing order")
        if problems:
            raise UserError("RetroConfig: " + "; ".join(problems))

    @property
    def neighbour_len(self) -> int:
        """r: a neighbour is the retrieved chunk and its continuation, as in RETRO."""
        return 2 * self.chunk_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "checkpoint") -> "RetroConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{source}: unknown Retro config keys {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------- attention pieces

def usable_mask(key_mask):
    """(N, S) real-key mask -> (attention mask (N, 1, 1, S), rows that have a real key (N,)).
    A row with no real key at all would be a softmax over nothing (NaN, which then spreads even
    through zero weights): it may read anything, and its reader zeroes the result."""
    if key_mask is None:
        return None, None
    has_keys = key_mask.any(dim=-1)
    return (key_mask | ~has_keys[:, None])[:, None, None], has_keys


class BidirectionalSelfAttention(Attention):
    """The decoder's attention (same projections, GQA, rotary positions) without the causal mask:
    each neighbour token reads the whole neighbour, except its padding."""

    def forward(self, x, cos, sin, key_mask):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        mask, _ = usable_mask(key_mask)
        y = F.scaled_dot_product_attention(q, self.expand_kv(k), self.expand_kv(v), attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class CrossAttention(nn.Module):
    """Queries from x (N, T, C), keys and values from memory (N, S, C); key_mask (N, S) marks real keys.
    No positions: what a memory token is was settled by the encoder, where it had them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.wq = nn.Linear(config.n_embd, inner, bias=False)
        self.wk = nn.Linear(config.n_embd, inner, bias=False)
        self.wv = nn.Linear(config.n_embd, inner, bias=False)
        self.wo = nn.Linear(inner, config.n_embd, bias=False)

    def heads(self, x, memory):
        """Queries (N, H, T, D) from x; keys and values (N, H, S, D) from memory."""
        (N, T, _), S = x.shape, memory.size(1)
        q = self.wq(x).view(N, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(memory).view(N, S, self.n_head, self.head_dim).transpose(1, 2)
        v = self.wv(memory).view(N, S, self.n_head, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, memory, key_mask=None):
        N, T, _ = x.shape
        q, k, v = self.heads(x, memory)
        mask, has_keys = usable_mask(key_mask)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.wo(y.transpose(1, 2).reshape(N, T, self.n_head * self.head_dim))
        return y if has_keys is None else y * has_keys[:, None, None]

    def attention_probs(self, x, memory, key_mask=None):
        """(N, H, T, S): how much each query reads each memory token; the softmax that forward's
        scaled_dot_product_attention computes without showing it. A row with no real key reads nothing (0)."""
        q, k, _ = self.heads(x, memory)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        mask, has_keys = usable_mask(key_mask)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        return probs if has_keys is None else probs * has_keys[:, None, None, None]


# ----------------------------------------------------------------------------- the encoder

class EncoderBlock(nn.Module):
    """Pre-norm like the decoder's Block: bidirectional self-attention over one neighbour,
    cross-attention to the decoder's states of the chunk that retrieved it (RETRO's
    conditioning; left out when condition=False), then the feed-forward."""

    def __init__(self, config: ModelConfig, condition: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        # no smeared keys here even on a smeared base: a bidirectional encoder has no "token before"
        self.attn = BidirectionalSelfAttention(replace(config, smear_keys=False), layer_idx=0)
        self.cross_norm = RMSNorm(config.n_embd, config.norm_eps) if condition else None
        self.cross = CrossAttention(config) if condition else None
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x, cos, sin, key_mask, chunk_states=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, key_mask)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), chunk_states)
        return x + self.ffn(self.ffn_norm(x))


class RetroEncoder(nn.Module):
    """(N, r, C) embedded neighbour tokens -> (N, r, C) states, each neighbour on its own."""

    def __init__(self, config: ModelConfig, retro: RetroConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(config, retro.condition) for _ in range(retro.encoder_layers))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        cos, sin = rope_tables(config.head_dim, retro.neighbour_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x, key_mask, chunk_states=None):
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin, key_mask, chunk_states)
        return self.norm(x)


# ----------------------------------------------------------------------------- chunked cross-attention

class RetroContext:
    """What the CCA layers of one forward pass share: the neighbour tokens, and the encoder's
    output once the first CCA layer has computed it (from its own input, RETRO's conditioning)."""

    def __init__(self, neighbours, encode):
        self.neighbours, self.encode, self.memory = neighbours, encode, None

    def encoded(self, decoder_states):
        if self.memory is None:
            self.memory = self.encode(self.neighbours, decoder_states)
        return self.memory


class ChunkedCrossAttention(nn.Module):
    """The module plugged into a decoder block: x (B, T, C) -> (B, T, C), the neighbours' message
    to each position, times the gate tanh(alpha)."""

    def __init__(self, config: ModelConfig, chunk_size: int, gate_init: float = 0.0):
        super().__init__()
        self.chunk_size = chunk_size
        self.attn = CrossAttention(config)
        self.alpha = nn.Parameter(torch.tensor(float(gate_init)))  # tanh(0) = 0: the block is the plain decoder's

    def groups(self, x, context: RetroContext):
        """x (B, T, C) -> (queries (B*L, m, C), memory (B*L, k*r, C), key mask (B*L, k*r)), L = T // m:
        group u holds the positions allowed to read chunk u's neighbours, and those neighbours."""
        B, T, C = x.shape
        m, L = self.chunk_size, T // self.chunk_size  # L: chunks whose last token is in the input
        memory, key_mask = context.encoded(x)  # (B, L, k*r, C), (B, L, k*r)
        # Shift left by m-1: position m-1 (the last token of chunk 0) heads group 0, so group u
        # holds positions u*m+m-1 ... u*m+2m-2, exactly those allowed to read chunk u's neighbours.
        shifted = F.pad(x[:, m - 1:], (0, 0, 0, L * m - (T - m + 1)))
        return shifted.reshape(B * L, m, C), memory.reshape(B * L, -1, C), key_mask.reshape(B * L, -1)

    def forward(self, x, context: RetroContext):
        B, T, C = x.shape
        m = self.chunk_size
        if T < m:  # no chunk is complete yet: nobody may read a neighbour
            return torch.zeros_like(x)
        y = self.attn(*self.groups(x, context))
        # Shift back: the first m-1 positions read nothing (zeros); what fell off the end was padding.
        y = F.pad(y.reshape(B, (T // m) * m, C)[:, :T - m + 1], (0, 0, m - 1, 0))
        return torch.tanh(self.alpha) * y

    def attention_probs(self, x, context: RetroContext):
        """(B, L, H, m, k*r): for each group of positions (see groups), how much each reads each
        neighbour token. Position t is row (t - m + 1) % m of group (t - m + 1) // m."""
        B, T, _ = x.shape
        probs = self.attn.attention_probs(*self.groups(x, context))  # (B*L, H, m, k*r)
        return probs.reshape(B, T // self.chunk_size, *probs.shape[1:])


# ----------------------------------------------------------------------------- the model

class RetroModel(nn.Module):
    """The common decoder with CCA in `retro.cca_layers` and the neighbour encoder beside it.

    `decoder` is modified in place (CCA slots filled); its own weights are untouched, so a
    pretrained decoder becomes a Retro model that, with the gates at 0 or CCA's output projections at
    zero (retro.zero_output), still computes the same."""

    def __init__(self, decoder: Transformer, retro: RetroConfig):
        super().__init__()
        n_layer = decoder.config.n_layer
        if not all(0 <= i < n_layer for i in retro.cca_layers):
            raise UserError(f"cca_layers={retro.cca_layers}: the decoder has layers 0 to {n_layer - 1}")
        if decoder.config.block_size < retro.chunk_size:
            raise UserError(f"chunk_size={retro.chunk_size} is longer than the decoder's block_size="
                            f"{decoder.config.block_size}")
        self.retro = retro
        self.decoder = decoder
        self.encoder = RetroEncoder(decoder.config, retro)
        for i in retro.cca_layers:
            decoder.blocks[i].add_cross_attention(ChunkedCrossAttention(decoder.config, retro.chunk_size,
                                                                        retro.gate_init))
        new = [self.encoder] + [decoder.blocks[i].cross_attn for i in retro.cca_layers]
        for module in new:  # the decoder's own initialisation (N(0, 0.02)) for what is new
            module.apply(Transformer._init_weights)
            for name, p in module.named_parameters():
                if name.endswith(("wo.weight", "w_down.weight")):  # residual branches, as in the decoder
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if retro.zero_output:  # CCA adds exactly nothing until training moves its output projection
            for i in retro.cca_layers:
                nn.init.zeros_(decoder.blocks[i].cross_attn.attn.wo.weight)
        self.to(decoder.lm_head.weight.device)

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    def forward(self, idx, targets=None, neighbours=None):
        """idx (B, T) -> (logits, loss), reading neighbours (B, >= T // m, k, 2m) if given;
        neighbours=None is retrieval off: the decoder alone."""
        context = None
        if neighbours is not None:
            check_neighbours(neighbours, self.retro, idx.size(1))
            context = RetroContext(neighbours, self.encode)
        return self.decoder(idx, targets, context=context)

    def encode(self, neighbours, decoder_states):
        """Neighbour tokens (B, >= L, k, r) and the decoder's states (B, T, C) at the first CCA layer ->
        memory (B, L, k*r, C) and its mask of real tokens (B, L, k*r). Neighbour tokens are embedded with
        the decoder's own table, shared as in RETRO."""
        B, T, C = decoder_states.shape
        m, k, r = self.retro.chunk_size, self.retro.k, self.retro.neighbour_len
        L = T // m
        tokens = neighbours[:, :L].reshape(B * L * k, r)
        real = tokens != NO_TOKEN
        if self.retro.condition:
            # each neighbour is conditioned on the m states of the chunk that retrieved it
            chunk_states = decoder_states[:, :L * m].reshape(B * L, m, C).repeat_interleave(k, dim=0)
            memory = self.encoder(self.decoder.embed(tokens.clamp(min=0)), real, chunk_states)
        else:
            # neighbours repeat (consecutive chunks retrieve the same fact sheet): encode each once
            distinct, where = torch.unique(tokens, dim=0, return_inverse=True)
            memory = self.encoder(self.decoder.embed(distinct.clamp(min=0)), distinct != NO_TOKEN)[where]
        return memory.reshape(B, L, k * r, C), real.reshape(B, L, k * r)

    def gates(self) -> list[float]:
        """tanh(alpha) of each CCA layer: how far each is open."""
        return [float(torch.tanh(self.decoder.blocks[i].cross_attn.alpha.detach())) for i in self.retro.cca_layers]

    @torch.no_grad()
    def cca_attention(self, idx, neighbours) -> list:
        """Read idx (B, T) with its neighbours and return, for each CCA layer, what each position read in
        each neighbour token: (B, L, H, m, k*r) probabilities (ChunkedCrossAttention.attention_probs)."""
        inputs = {}
        hooks = [self.decoder.blocks[i].cross_attn.register_forward_pre_hook(
            lambda module, args, i=i: inputs.__setitem__(i, args)) for i in self.retro.cca_layers]
        try:
            self(idx, neighbours=neighbours)
        finally:
            for hook in hooks:
                hook.remove()
        return [self.decoder.blocks[i].cross_attn.attention_probs(*inputs[i]) for i in self.retro.cca_layers]

    def base_parameters(self):
        """(name, parameter) of the decoder's own weights: everything but the CCA slots."""
        return [(n, p) for n, p in self.decoder.named_parameters() if ".cross_" not in n]

    def freeze_base(self) -> None:
        """RETRO-fitting: the pretrained decoder stays as it is; only the encoder and CCA learn."""
        for _, p in self.base_parameters():
            p.requires_grad_(False)


def check_neighbours(neighbours, retro: RetroConfig, seq_len: int) -> None:
    """A neighbour tensor must have the model's k and neighbour length, and a row for every chunk."""
    if neighbours.dim() != 4:
        raise UserError(f"neighbours should be (batch, chunks, k, tokens), got shape {tuple(neighbours.shape)}")
    _, n_chunks, k, r = neighbours.shape
    if k != retro.k:
        raise UserError(f"the neighbours have k={k} per chunk but this Retro model reads k={retro.k}; "
                        f"retrieve with --k {retro.k}")
    if r != retro.neighbour_len:
        raise UserError(f"the neighbours are {r} tokens long but this Retro model's chunk size is "
                        f"{retro.chunk_size} (a neighbour is a chunk and its continuation: {retro.neighbour_len} "
                        f"tokens); use a database built with --chunk_size {retro.chunk_size}")
    if n_chunks < seq_len // retro.chunk_size:
        raise UserError(f"{n_chunks} chunks of neighbours for {seq_len} tokens; need "
                        f"{seq_len // retro.chunk_size} (one per chunk of {retro.chunk_size})")


def check_shape(retro: RetroConfig, source: str, chunk_size: int | None = None, k: int | None = None) -> None:
    """A chunk size or k asked for on the command line (None: not asked) must be the Retro model's own."""
    differ = [f"--{name} {value}" for name, value in (("chunk_size", chunk_size), ("k", k))
              if value is not None and value != getattr(retro, name)]
    if differ:
        raise UserError(f"{source} reads chunks of {retro.chunk_size} tokens and k={retro.k} neighbours, not "
                        f"{' '.join(differ)}: leave the flag out, or train a Retro model with it: "
                        f"{next_command(MAKE_RETRO + ' ' + ' '.join(differ))}")


# ----------------------------------------------------------------------------- checkpoints

DATABASE_KEYS = ("tokenizer_sha", "chunk_size", "k", "embedder")  # what a reader must share with training


def check_database(saved: dict, found: dict, source: str, fix: str = MAKE_RETRO) -> None:
    """The database a model reads must be the one it was trained with: same tokenizer, chunk size,
    k and embedder. Keys missing on either side are not compared."""
    differ = [f"{key}={found[key]!r} there but {saved[key]!r} in training"
              for key in DATABASE_KEYS if key in saved and key in found and saved[key] != found[key]]
    if differ:
        raise UserError(f"{source}: a neighbour table from another database than this Retro model was "
                        f"trained with ({'; '.join(differ)}); run {next_command(fix)}")


def retro_checkpoint(model: RetroModel, database: dict, **extra) -> dict:
    """{"config": the decoder's, "retro": RetroConfig, "database": its metadata, "model": weights}."""
    return {"config": model.config.to_dict(), "retro": model.retro.to_dict(), "database": dict(database),
            "model": model.state_dict(), **extra}


def load_retro(path, device="cpu", hint: str = MAKE_RETRO) -> tuple[RetroModel, dict]:
    """A Retro checkpoint -> (model in eval mode, the checkpoint's database metadata).
    hint: the command that makes such a checkpoint, named when the file is missing or a plain model's."""
    ckpt = load_checkpoint(path, hint=hint)
    if "retro" not in ckpt:
        raise UserError(f"{path}: a plain model checkpoint where a Retro one is expected (it has no 'retro' "
                        f"entry); make a Retro model with {next_command(hint)}")
    decoder = Transformer(ModelConfig.from_dict(ckpt["config"], str(path)))
    model = RetroModel(decoder, RetroConfig.from_dict(ckpt["retro"], str(path)))
    load_weights(model, ckpt["model"], str(path))
    return model.to(device).eval(), ckpt.get("database", {})


def load_plain(path, device="cpu") -> Transformer:
    """A plain model checkpoint (what RETRO-fitting starts from); a Retro checkpoint is refused."""
    ckpt = load_checkpoint(path, hint=MAKE_BASE)
    if "retro" in ckpt:
        raise UserError(f"{path}: a Retro checkpoint where a plain model is expected; pass a plain model "
                        f"such as step 3's (out/step3/model.pt, made by {next_command(MAKE_BASE)})")
    return model_from_checkpoint(ckpt, str(path)).to(device).eval()
