"""The vision-language model: a tiny ViT sees, a resampler gathers, a projector translates, the language model talks.

    image (3, 32, 32) --patches 4x4--> 64 patch vectors --ViT blocks--> 64 "seen" vectors
        --resampler: 6 learned queries read them--> 6 slot vectors --LayerNorm + MLP--> 6 vectors of the LM's width
    "<|im_start|>user\\nWhat colour is the circle?\\n <image> x6 <|im_end|>..."
        model.embed(ids): the 6 <image> rows are overwritten by those 6 vectors -> model(inputs_embeds=...)

Everything the language model knows about the image passes through the overwritten rows; the
answer's tokens read them with ordinary (causal) attention, as they read earlier words.

Why a ViT and not the common model's Block: a Block is causal and orders its positions with
RoPE, but a picture has no "earlier" patch: every patch must see every other, and where a patch
sits is a learned 2-D position embedding. PyTorch's nn.TransformerEncoderLayer is exactly such a
bidirectional pre-norm block. Why a resampler (Flamingo's, BLIP-2's): stage 0 teaches slot i to
report the shape of the i-th colour, so the language model finds "the red one" at the same image
position in every picture instead of searching 16 patch tokens for it (EXPERIMENTS.md measures
both). VisionConfig(slots=0) gives LLaVA's way instead: every patch vector is kept, and nanoVLM's
pixel shuffle folds each 2x2 group into one (4x wider) vector: 16 image positions.

    vlm = VisionLanguageModel(lm, VisionConfig(), image_token_id=tok.image_id)
    logits, loss = vlm(idx, images, targets)        # images: (n, 3, 32, 32), one per <image> tag
"""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from common.checkpoint import check_tokenizer, load_checkpoint, save_checkpoint
from common.cli import UserError, next_command
from common.model import KVCache, ModelConfig, RMSNorm, Transformer
from step2_model.inspect_model import count_trainable
from step6_multimodal.images import IMAGE_SIZE

VLM_FORMAT = "lm-tutorial-vlm"
MAKE_VLM = "python step6_multimodal/train_vlm.py"


@dataclass
class VisionConfig:
    image_size: int = IMAGE_SIZE
    patch_size: int = 4     # pixels per side of a patch
    stem_width: int = 0     # channels of a 3x3 convolution before the patch embedding; 0: none (a plain ViT)
    width: int = 128        # the encoder's vector size
    n_layer: int = 2
    n_head: int = 4
    slots: int = 6          # a resampler's learned queries: this many image tokens (stage 0: one per colour)
    shuffle: int = 2        # slots=0: keep the patches, folding shuffle x shuffle neighbours into one token
    projector_hidden: int = 512
    norm_output: bool = True   # RMSNorm the image vectors to the size of word vectors (EXPERIMENTS.md)

    def __post_init__(self):
        grid = self.image_size // self.patch_size
        if self.image_size % self.patch_size or grid % self.shuffle or self.width % self.n_head:
            raise UserError(f"VisionConfig: image_size {self.image_size} must be a multiple of patch_size "
                            f"{self.patch_size}, the grid ({grid}) of shuffle {self.shuffle}, width of n_head")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_image_tokens(self) -> int:
        """How many positions one image takes in the language model's sequence."""
        return self.slots or (self.grid // self.shuffle) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        d = {"slots": 0, "norm_output": False, **d}  # saved before these existed: their old behaviour
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class VisionEncoder(nn.Module):
    """A tiny ViT: cut the image into patches, embed each linearly, add a learned position per
    patch, and let every patch attend to every other for n_layer blocks."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        # A convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better"):
        # one 3x3 convolution finds edges and corners at every pixel before the picture is cut up.
        channels = config.stem_width or 3
        self.stem = (nn.Sequential(nn.Conv2d(3, channels, kernel_size=3, padding=1), nn.GELU())
                     if config.stem_width else nn.Identity())
        # a conv with kernel = stride = patch size is "flatten each patch, multiply by one matrix"
        self.patch_embed = nn.Conv2d(channels, config.width, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, config.grid ** 2, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.width, config.n_head, 4 * config.width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.width)
        self.resampler = Resampler(config) if config.slots else None

    def patches(self, images):
        """(n, 3, H, W) -> (n, grid*grid, width), patches in reading order (row by row)."""
        x = self.patch_embed(self.stem(images)).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images):
        """What the projector gets: the patch vectors, or the resampler's slots (n, slots, width)."""
        patches = self.patches(images)
        return self.resampler(patches) if self.resampler is not None else patches


class Resampler(nn.Module):
    """Learned queries that read the patches (Flamingo's Perceiver Resampler, BLIP-2's Q-Former, in
    one block): query i attends over all patches and keeps what it finds, so the picture reaches the
    language model as `slots` vectors however many patches it has. Stage 0 gives each query a job
    (pretrain_encoder.py): slot i reports the shape of the i-th colour, so "the red one" is always
    the same image position."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, config.slots, config.width) * 0.02)
        self.norm_patches = nn.LayerNorm(config.width)
        self.attend = nn.MultiheadAttention(config.width, config.n_head, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(config.width), nn.Linear(config.width, 4 * config.width), nn.GELU(),
                                 nn.Linear(4 * config.width, config.width))
        self.norm = nn.LayerNorm(config.width)

    def forward(self, patches):
        kv = self.norm_patches(patches)
        q = self.queries.expand(patches.size(0), -1, -1)
        x = q + self.attend(q, kv, kv, need_weights=False)[0]
        return self.norm(x + self.mlp(x))


def pixel_shuffle(x, grid: int, factor: int):
    """(n, grid*grid, C) -> (n, (grid/factor)^2, C*factor^2): each factor x factor square of
    neighbouring patch vectors becomes one vector (their concatenation), still in reading order."""
    n, _, c = x.shape
    g = grid // factor
    x = x.view(n, g, factor, g, factor, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * g, factor * factor * c)


class Projector(nn.Module):
    """Encoder vectors -> the language model's embedding space: LayerNorm, 2-layer MLP (minimind-v's
    and LLaVA-1.5's projector), then an RMSNorm to word size; patch vectors (slots=0) are first
    folded by nanoVLM's pixel shuffle."""

    def __init__(self, config: VisionConfig, lm_width: int):
        super().__init__()
        self.config = config
        folded = config.width if config.slots else config.width * config.shuffle ** 2
        self.norm = nn.LayerNorm(folded)
        self.mlp = nn.Sequential(nn.Linear(folded, config.projector_hidden), nn.GELU(),
                                 nn.Linear(config.projector_hidden, lm_width))
        # Image vectors kept as large as word vectors: unchecked they grow ~85 times larger, and the
        # layers' additions can hardly change what sits at an image position (EXPERIMENTS.md).
        self.out_norm = RMSNorm(lm_width) if config.norm_output else nn.Identity()

    def match_scale(self, token_embeddings: torch.Tensor) -> None:
        """Start the output gain at the root-mean-square of the language model's token embeddings."""
        if isinstance(self.out_norm, RMSNorm):
            with torch.no_grad():
                self.out_norm.weight.fill_(float(token_embeddings.float().pow(2).mean().sqrt()))

    def forward(self, x):
        if not self.config.slots:  # patch vectors: fold neighbours; slots are few already
            x = pixel_shuffle(x, self.config.grid, self.config.shuffle)
        return self.out_norm(self.mlp(self.norm(x)))


class VisionLanguageModel(nn.Module):
    def __init__(self, lm: Transformer, vision_config: VisionConfig, image_token_id: int):
        super().__init__()
        if not 0 <= image_token_id < lm.config.vocab_size:
            raise UserError(f"image token id {image_token_id} is outside the model's vocabulary")
        self.vision_config, self.image_token_id = vision_config, image_token_id
        self.encoder = VisionEncoder(vision_config)
        self.projector = Projector(vision_config, lm.config.n_embd)
        self.projector.match_scale(lm.tok_emb.weight)
        self.lm = lm

    @property
    def config(self) -> ModelConfig:
        """The language model's config (block_size, ...): what chat code asks a model for."""
        return self.lm.config

    @property
    def n_image_tokens(self) -> int:
        return self.vision_config.n_image_tokens

    def image_features(self, images):
        """(n, 3, H, W) -> (n, n_image_tokens, lm width): what replaces the placeholders."""
        size = self.vision_config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise UserError(f"images must be (n, 3, {size}, {size}), got {tuple(images.shape)}; "
                            f"load files with step6_multimodal.images.load_image")
        return self.projector(self.encoder(images))

    def embed(self, idx, images):
        """Token embeddings with every <image> placeholder row replaced by image features, in order:
        image 0 fills the first n_image_tokens placeholders (reading row by row), image 1 the next..."""
        x = self.lm.embed(idx)
        is_image = idx == self.image_token_id
        expected = images.size(0) * self.n_image_tokens
        if int(is_image.sum()) != expected:
            raise UserError(f"{int(is_image.sum())} image positions in the tokens but {images.size(0)} image(s) "
                            f"x {self.n_image_tokens} tokens = {expected}; every <image> tag needs one image")
        if expected == 0:
            return x
        features = self.image_features(images).to(x.dtype)
        return x.masked_scatter(is_image.unsqueeze(-1), features)

    def forward(self, idx, images, targets=None):
        return self.lm(inputs_embeds=self.embed(idx, images), targets=targets)

    @torch.no_grad()
    def generate(self, idx, images, max_new_tokens: int, stop_token: int) -> list[int]:
        """Greedy reply to one prompt (1, T): the new token ids, without the stop token.
        The prompt goes in as embeddings (images included) once; then token by token with the KV cache."""
        room = self.config.block_size - idx.size(1)
        if room < 1:
            raise UserError(f"the prompt has {idx.size(1)} tokens; the context holds {self.config.block_size}")
        cache = KVCache(self.config, 1, idx.device, self.lm.lm_head.weight.dtype)
        logits, _ = self.lm(inputs_embeds=self.embed(idx, images), kv_cache=cache, last_only=True)
        new = []
        for _ in range(min(max_new_tokens, room)):
            token = logits[:, -1].argmax(-1)
            if int(token) == stop_token:
                break
            new.append(int(token))
            if cache.length >= self.config.block_size:
                break
            logits, _ = self.lm(token[:, None], kv_cache=cache, last_only=True)
        return new


def parameter_counts(vlm: VisionLanguageModel) -> dict:
    """Parameters by part; a tied weight counts once."""
    return {"encoder": count_trainable(vlm.encoder)[1], "projector": count_trainable(vlm.projector)[1],
            "language_model": count_trainable(vlm.lm)[1]}


def save_vlm(vlm: VisionLanguageModel, path) -> None:
    save_checkpoint(vlm_checkpoint_meta(vlm) | {"model": vlm.state_dict()}, path)


def vlm_checkpoint_meta(vlm: VisionLanguageModel) -> dict:
    """Everything but the weights: enough to rebuild the model (training checkpoints carry it too), and the
    fingerprint of the tokenizer it was trained with when train_vlm.py set one (vlm.tokenizer_fingerprint)."""
    meta = {"format": VLM_FORMAT, "config": vlm.lm.config.to_dict(), "vision_config": asdict(vlm.vision_config),
            "image_token_id": vlm.image_token_id}
    if getattr(vlm, "tokenizer_fingerprint", None):
        meta["tokenizer_fingerprint"] = vlm.tokenizer_fingerprint
    return meta


def load_vlm(path, device="cpu", tokenizer_fingerprint: str | None = None) -> VisionLanguageModel:
    """A saved VisionLanguageModel, in eval mode, or a one-line UserError. With `tokenizer_fingerprint`
    (of the tokenizer the caller will use), a model trained with another tokenizer is refused."""
    ckpt = load_checkpoint(path, hint=MAKE_VLM)
    if ckpt.get("format") != VLM_FORMAT:
        raise UserError(f"{path}: not a vision-language checkpoint (format {ckpt.get('format')!r}); "
                        f"run {next_command(MAKE_VLM)}")
    if tokenizer_fingerprint is not None:
        check_tokenizer(ckpt, tokenizer_fingerprint, path)
    lm = Transformer(ModelConfig.from_dict(ckpt["config"], str(path)))
    vlm = VisionLanguageModel(lm, VisionConfig.from_dict(ckpt["vision_config"]), int(ckpt["image_token_id"]))
    try:
        vlm.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit the saved config ({str(err).splitlines()[0][:200]})") from None
    vlm.tokenizer_fingerprint = ckpt.get("tokenizer_fingerprint")
    return vlm.to(device).eval()
