"""LoRA (low-rank adaptation), written from scratch.

Full fine-tuning changes every weight matrix W (out x in). LoRA freezes W and
learns a low-rank change instead:

    y = W x + (alpha / r) * B A x        A: r x in,  B: out x r,  r << in, out

Only A and B train: (in + out) * r numbers per layer instead of in * out.
A starts random and B starts at zero, so B A = 0 and the wrapped model is
exactly the pretrained one at step 0; training moves away from it smoothly.
alpha / r keeps the size of the update comparable when you change r.

After training, merge() folds the update into W (W' = W + alpha/r * B A):
the merged model is an ordinary model again, with no extra matmul at
inference. Before merging, the adapter is tiny on disk: only A and B, plus
the settings and the base model's config so it cannot be put on the wrong model.

One more small thing trains: the embedding rows of the chat template's special
tokens (TokenRows). Pretraining never showed the model <|im_start|> and taught
it never to write <|im_end|>; a low-rank change of the attention cannot give a
token a vector of its own, so those two rows (2 x n_embd numbers) learn too.
PEFT calls this trainable_token_indices.

The file reads in that order: the idea (LoRALinear, apply_lora, merge_lora), the two
token rows, how the layers to wrap are named and checked, then adapter files and the
checks that keep an adapter off the wrong model.

    model = load_model("out/step3/model.pt")
    wrapped = apply_lora(model, targets=("wq", "wv"), r=8, alpha=16,   # freezes the rest
                         token_ids=[tok.im_start_id, tok.im_end_id])
    ... train ...
    save_adapter(model, "out/step4/lora_adapter.pt")
    merge_lora(model)                                                  # plain Transformer again
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("step4_sft/lora.py is a module, not a script: "
                     "step4_sft/train_lora.py and step4_sft/chat.py use it")

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_checkpoint, save_checkpoint
from common.cli import UserError, next_command

ADAPTER_FORMAT = "lm-tutorial-lora-adapter"
ATTENTION = ("wq", "wk", "wv", "wo")
FEED_FORWARD = ("w_gate", "w_up", "w_down")
ALL_LINEAR = ATTENTION + FEED_FORWARD  # every nn.Linear in a block (not lm_head: it is tied to the embedding)


# ----------------------------------------------------------------------------
# The idea: a frozen layer plus a low-rank update


class LoRALinear(nn.Module):
    """An nn.Linear (frozen) plus a trainable low-rank update (alpha / r) * B A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        # kaiming-uniform like nn.Linear's own init: A x has a sensible size from the start,
        # while B = 0 makes the whole update zero until B learns something
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update as a full matrix, out x in: what merging adds to W."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """W <- W + (alpha / r) B A; return the plain nn.Linear (same output, one matmul)."""
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


def apply_lora(model: nn.Module, targets=("wq", "wv"), r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, token_ids=()) -> list[str]:
    """Freeze every parameter of `model` and wrap the target linear layers in LoRALinear,
    in place; the embedding rows of `token_ids` (if any) train too. Returns the names of the
    wrapped layers."""
    if r < 1:
        raise UserError(f"--lora_r {r} must be at least 1")
    if lora_layers(model):
        raise UserError("this model already has LoRA layers; merge_lora() them first")
    token_ids = _checked_token_ids(model, token_ids)  # before anything is changed
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent, attr, full_name in _target_layers(model, set(targets)):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha, dropout))
        wrapped.append(full_name)
    if not wrapped:
        raise UserError(f"no layer of the model is called any of {list(targets)}")
    if token_ids:
        _wrap_token_rows(model, token_ids)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (and trained token row) into its base weight and put the plain
    modules back, in place. The result has the base model's exact structure and state_dict keys."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.merge())
    merged = set()  # a tied matrix is one tensor: add its shared delta once
    for name, rows in token_rows(model).items():
        with torch.no_grad():
            if id(rows.base.weight) not in merged:
                rows.base.weight.index_add_(0, rows.token_ids, rows.token_delta.to(rows.base.weight.dtype))
                merged.add(id(rows.base.weight))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, rows.base)
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Take every LoRA layer and token-row wrapper off without merging, in place: the base model
    again, exactly (its weights were frozen and never changed). Then another adapter can go on."""
    for name, module in {**lora_layers(model), **token_rows(model)}.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.base)
    for p in model.parameters():
        p.requires_grad_(True)  # as a freshly loaded model
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------
# The two token rows


class TokenRows(nn.Module):
    """A frozen (vocab x n_embd) matrix -- the token embedding, or the lm_head -- plus trainable
    changes to a few of its rows. With tied embeddings both wrappers share one `token_delta`,
    as they share one matrix. The delta starts at zero: the model is unchanged at step 0."""

    def __init__(self, base: nn.Embedding | nn.Linear, token_ids, token_delta: nn.Parameter):
        super().__init__()
        self.base, self.token_delta = base, token_delta
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long,
                                                       device=base.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight.index_add(0, self.token_ids, self.token_delta.to(self.base.weight.dtype))

    def forward(self, x):
        return F.embedding(x, self.weight) if isinstance(self.base, nn.Embedding) else F.linear(x, self.weight)


def _wrap_token_rows(model: nn.Module, token_ids) -> None:
    """Wrap the embedding and the lm_head so that the rows of `token_ids` (checked, sorted) train."""
    device = model.tok_emb.weight.device
    delta = nn.Parameter(torch.zeros(len(token_ids), model.config.n_embd, device=device))
    tied = model.lm_head.weight is model.tok_emb.weight
    model.tok_emb = TokenRows(model.tok_emb, token_ids, delta)
    head_delta = delta if tied else nn.Parameter(torch.zeros_like(delta))
    model.lm_head = TokenRows(model.lm_head, token_ids, head_delta)


def token_rows(model: nn.Module) -> dict[str, TokenRows]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TokenRows)}


# ----------------------------------------------------------------------------
# What to wrap, checked


# PEFT's names (Llama's, in Hugging Face) for the same seven layers, so a lesson written for PEFT runs as written.
PEFT_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
              "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


def parse_targets(text: str) -> tuple[str, ...]:
    """"wq,wv" or PEFT's "q_proj,v_proj" -> ("wq", "wv"); "all-linear" -> every linear layer of a block."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all-linear"]:
        return ALL_LINEAR
    unknown = [n for n in names if n not in ALL_LINEAR and n not in PEFT_NAMES]
    if unknown or not names:
        raise UserError(f"--target_modules {text!r}: unknown layer names {unknown}; use a comma-separated subset "
                        f"of {','.join(ALL_LINEAR)} (or PEFT's {','.join(PEFT_NAMES)}), or all-linear")
    return tuple(dict.fromkeys(PEFT_NAMES.get(n, n) for n in names))  # our names, each once, in the given order


def _target_layers(model: nn.Module, targets) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute name, full name) of every nn.Linear whose name is in targets."""
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in targets and isinstance(child, nn.Linear):
                found.append((module, child_name, f"{name}.{child_name}" if name else child_name))
    return found


def _checked_token_ids(model: nn.Module, token_ids) -> list[int]:
    """Sorted, distinct ids (from a list or a tensor), all inside the vocabulary."""
    token_ids = sorted(set(int(i) for i in token_ids))
    bad = [i for i in token_ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise UserError(f"token ids {bad} are outside the vocabulary (0..{model.config.vocab_size - 1})")
    return token_ids


# ----------------------------------------------------------------------------
# Adapter files


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base weights (LoRA A/B excluded), to notice an adapter put on another
    pretrained model of the same size."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name and "token_delta" not in name:
            digest.update(name.replace(".base.", ".").encode())
            digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_dict(model: nn.Module) -> dict:
    """What an adapter file holds: the A and B matrices, the settings, the base config."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    return {
        "format": ADAPTER_FORMAT,
        "rank": first.r,
        "alpha": float(first.alpha),
        "dropout": float(first.dropout.p),
        "targets": sorted({name.rpartition(".")[2] for name in layers}),
        "base_config": model.config.to_dict(),
        "base_fingerprint": base_fingerprint(model),
        "token_ids": _token_ids(model),
        "weights": {k: v.detach().cpu().clone() for k, v in _adapter_weights(model).items()},
    }


def _token_ids(model: nn.Module) -> list[int]:
    rows = list(token_rows(model).values())
    return rows[0].token_ids.tolist() if rows else []


def _adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the adapter by name (live parameters); a tied token delta counts once."""
    weights = {f"{name}.{part}": getattr(layer, part) for name, layer in lora_layers(model).items()
               for part in ("lora_A", "lora_B")}
    seen = set()
    for name, rows in token_rows(model).items():
        if id(rows.token_delta) not in seen:
            weights[f"{name}.token_delta"] = rows.token_delta
            seen.add(id(rows.token_delta))
    return weights


def save_adapter(model: nn.Module, path) -> None:
    save_checkpoint(adapter_dict(model), path)


def load_adapter(model: nn.Module, path, hint: str = "python step4_sft/train_lora.py") -> nn.Module:
    """Put the adapter in `path` on `model` (in place) and return it.

    A plain model is wrapped with the adapter's settings first; a model that
    already has LoRA layers must have the adapter's rank and targets, and gets
    its weights (adapter A, then B on one base: B's model; unload_lora: the base
    again). Anything that does not fit (another base model, another rank or
    targets) is a UserError naming the difference."""
    adapter = load_checkpoint(path, hint=hint)
    if adapter.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{path}: not a LoRA adapter file (format {adapter.get('format')!r}); "
                        f"run {next_command(hint)}")
    base_config = model.config.to_dict()
    if adapter["base_config"] != base_config:
        differ = [f"{k}={v} there but {base_config.get(k)} here" for k, v in adapter["base_config"].items()
                  if base_config.get(k) != v]
        raise UserError(f"{path}: adapter was trained on a different base model ({'; '.join(differ)}); "
                        f"pass the --checkpoint it was trained on")
    here = base_fingerprint(model)
    if adapter.get("base_fingerprint") not in (None, here):  # same config, other weights (step 3 retrained?)
        raise UserError(f"{path}: adapter was trained on a different base model with the same config (base "
                        f"weights' fingerprint {adapter['base_fingerprint']} there but {here} here); "
                        f"pass the --checkpoint it was trained on")
    layers = lora_layers(model)
    if not layers:
        apply_lora(model, adapter["targets"], adapter["rank"], adapter["alpha"], adapter["dropout"],
                   token_ids=adapter.get("token_ids", []))
        layers = lora_layers(model)
    ranks = sorted({layer.r for layer in layers.values()})
    if ranks != [adapter["rank"]]:
        raise UserError(f"{path}: adapter has rank {adapter['rank']} but the model's LoRA layers have "
                        f"rank {ranks}; wrap the model with --lora_r {adapter['rank']}")
    if adapter.get("token_ids", []) != _token_ids(model):  # same count, other rows: would load silently
        raise UserError(f"{path}: adapter trains the rows of tokens {adapter.get('token_ids', [])} but the "
                        f"model's LoRA wraps {_token_ids(model)}; load it into a model without LoRA layers")
    if set(adapter["weights"]) != set(_adapter_weights(model)):
        wrapped = sorted({name.rpartition(".")[2] for name in layers})
        raise UserError(f"{path}: adapter targets {','.join(adapter['targets'])} but the model's LoRA layers wrap "
                        f"{','.join(wrapped)}; unload_lora() the model first, or wrap it with --target_modules "
                        f"{','.join(adapter['targets'])}")
    for key, tensor in adapter["weights"].items():
        module_name, _, part = key.rpartition(".")
        param = getattr(model.get_submodule(module_name), part)
        if tensor.shape != param.shape:
            raise UserError(f"{path}: {key} is {tuple(tensor.shape)} but rank {adapter['rank']} needs "
                            f"{tuple(param.shape)}; the file is damaged or was edited")
        with torch.no_grad():
            param.copy_(tensor)
    return model
