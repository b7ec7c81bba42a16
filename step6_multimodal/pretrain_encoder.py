"""Stage 0: teach the vision encoder to see, before it ever meets the language model.

LLaVA and minimind-v start from a vision encoder someone else pretrained (CLIP, SigLIP) on
hundreds of millions of pictures. Ours starts from random weights, and the language model's
answers are a weak, slow signal for it: trained only through them, the encoder learned colour and
"how much is coloured" but read a lone shape's kind at chance (EXPERIMENTS.md, sections 3 and 5).
So it gets its own pretraining, as CLIP does -- with labels instead of captions, because our
pictures come with them for free: for every patch, which shape covers it; for every slot of the
resampler, the shape of that slot's colour.

    patch (r, c) of a picture  ->  encoder  ->  head  ->  colour of the shape covering it (or none)
                                                          kind of that shape (circle, square, triangle, none)
                                                          where that shape's centre is (x, y)
    slot i (the i-th colour)   ->  resampler -> slot head -> kind of the shape of that colour (or none)
                                                              where its centre is (x, y)

A 4x4-pixel patch inside a square looks exactly like one inside a circle: to name the kind, a
patch must look at its neighbours, which is what the encoder's attention is for. And every patch
of a shape learns to say where the whole shape is, which left/right and above/below questions need.
The heads are thrown away afterwards; the encoder keeps what it learned and is frozen (unless
train_vlm.py --tune_encoder).

    labeller = PatchLabeller(vlm.encoder)                        # train_vlm.see() does this
    outputs, loss = labeller(**labelled_batch(64, patch_size=4, seed=0, step=0))
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import UserError
from step6_multimodal.images import COLOURS, IMAGE_SIZE, KINDS, MAX_SHAPES, draw, random_scene, shape_mask, to_tensor

COLOUR_NAMES, N_COLOURS, N_KINDS = list(COLOURS), len(COLOURS) + 1, len(KINDS) + 1  # index 0: no shape
MIN_COVER = 0.25  # a patch belongs to a shape when the shape covers at least this share of its pixels


def patch_labels(scene, patch_size: int) -> dict:
    """Per patch (reading order): "colour" and "kind" (0 = background, i+1 = COLOURS'/KINDS' i-th)
    and "centre" (x, y of the covering shape's centre, scaled to -1..1; 0 for background)."""
    grid = IMAGE_SIZE // patch_size
    colour = np.zeros(grid * grid, dtype=np.int64)
    kind = np.zeros(grid * grid, dtype=np.int64)
    centre = np.zeros((grid * grid, 2), dtype=np.float32)
    if scene:
        cover = np.stack([shape_mask(s).reshape(grid, patch_size, grid, patch_size).mean((1, 3)).ravel()
                          for s in scene])  # (shapes, patches): share of each patch each shape covers
        owner, share = cover.argmax(0), cover.max(0)
        for i, shape in enumerate(scene):
            mine = (owner == i) & (share >= MIN_COVER)
            colour[mine] = COLOUR_NAMES.index(shape.colour) + 1
            kind[mine] = KINDS.index(shape.kind) + 1
            centre[mine] = np.array(shape.centre) / IMAGE_SIZE * 2 - 1
    return {"colour": colour, "kind": kind, "centre": centre}


def slot_labels(scene) -> dict:
    """Per colour (COLOURS' order), what a resampler's slot of that colour should report:
    "slot_kind" (0 = no shape of this colour, i+1 = KINDS' i-th) and "slot_centre" (-1..1; 0 if none)."""
    kind = np.zeros(len(COLOUR_NAMES), dtype=np.int64)
    centre = np.zeros((len(COLOUR_NAMES), 2), dtype=np.float32)
    for shape in scene:
        i = COLOUR_NAMES.index(shape.colour)
        kind[i] = KINDS.index(shape.kind) + 1
        centre[i] = np.array(shape.centre) / IMAGE_SIZE * 2 - 1
    return {"slot_kind": kind, "slot_centre": centre}


def labelled_batch(batch_size: int, patch_size: int, seed: int, step: int) -> dict:
    """Fresh pictures of 0..MAX_SHAPES shapes and their patch labels: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step, 0])
    scenes = [random_scene(rng, int(rng.integers(0, MAX_SHAPES + 1))) for _ in range(batch_size)]
    labels = [patch_labels(s, patch_size) | slot_labels(s) for s in scenes]
    batch = {key: torch.from_numpy(np.stack([l[key] for l in labels])) for key in labels[0]}
    return {"images": torch.stack([to_tensor(draw(s)) for s in scenes]), **batch}


class PatchLabeller(nn.Module):
    """The encoder with a linear head per patch (and per slot, if it has a resampler); forward
    returns (outputs, loss) like every model here."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.width, N_COLOURS + N_KINDS + 2)
        self.slot_head = None
        if encoder.resampler is not None:
            if encoder.config.slots != len(COLOUR_NAMES):
                raise UserError(f"stage 0 gives the resampler one slot per colour: slots must be "
                                f"{len(COLOUR_NAMES)}, not {encoder.config.slots}")
            self.slot_head = nn.Linear(encoder.config.width, N_KINDS + 2)

    def forward(self, images, colour=None, kind=None, centre=None, slot_kind=None, slot_centre=None):
        patches = self.encoder.patches(images)
        colour_logits, kind_logits, xy = self.head(patches).split([N_COLOURS, N_KINDS, 2], dim=-1)
        outputs = {"colour": colour_logits, "kind": kind_logits, "centre": xy}
        if self.slot_head is not None:
            slot_kind_logits, slot_xy = self.slot_head(self.encoder.resampler(patches)).split([N_KINDS, 2], dim=-1)
            outputs |= {"slot_kind": slot_kind_logits, "slot_centre": slot_xy}
        if colour is None:
            return outputs, None
        loss = (F.cross_entropy(colour_logits.flatten(0, 1), colour.flatten())
                + F.cross_entropy(kind_logits.flatten(0, 1), kind.flatten()) + _place_loss(xy, centre, kind))
        if self.slot_head is not None:
            loss = loss + (F.cross_entropy(outputs["slot_kind"].flatten(0, 1), slot_kind.flatten())
                           + _place_loss(outputs["slot_centre"], slot_centre, slot_kind))
        return outputs, loss


def _place_loss(xy, centre, kind):
    """Squared error of the centre where there is a shape; elsewhere there is nothing to say."""
    on_shape = (kind > 0).unsqueeze(-1).float()
    return ((xy - centre) ** 2 * on_shape).sum() / on_shape.sum().clamp(min=1)


@torch.no_grad()
def patch_accuracy(labeller: PatchLabeller, batch: dict) -> dict:
    """Share of shape-covered patches whose colour and kind the head names right; mean centre error
    (pixels); with a resampler, the same for the slots of colours in the picture, and the share of
    the other slots that say "none"."""
    out, _ = labeller(batch["images"])
    on = batch["kind"] > 0
    error = (out["centre"] - batch["centre"]).norm(dim=-1)[on].mean() * IMAGE_SIZE / 2
    result = {"colour": float((out["colour"].argmax(-1) == batch["colour"])[on].float().mean()),
              "kind": float((out["kind"].argmax(-1) == batch["kind"])[on].float().mean()),
              "centre_error_pixels": float(error)}
    if "slot_kind" in out:
        filled, said = batch["slot_kind"] > 0, out["slot_kind"].argmax(-1)
        result["slot_kind"] = float((said == batch["slot_kind"])[filled].float().mean())
        result["slot_empty"] = float((said == 0)[~filled].float().mean())
        result["slot_centre_error_pixels"] = float(
            (out["slot_centre"] - batch["slot_centre"]).norm(dim=-1)[filled].mean() * IMAGE_SIZE / 2)
    return result
