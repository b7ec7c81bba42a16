"""What do the image vectors say? A probe: can colour and shape be read off them directly?

    python step6_multimodal/probe_encoder.py                      # out/step6/vlm.pt
    python step6_multimodal/probe_encoder.py --checkpoint other.pt

It draws pictures of ONE shape, takes the projector's vectors (the ones that replace the <image>
tokens) -- all of them for slots, each feature's largest value over the positions for patch
tokens -- and classifies the shape's colour and kind by the nearest class average (fitted on two
thirds, tested on the rest). High accuracy: the information is there, plainly. It also compares the vectors' size with the token
embeddings' (EXPERIMENTS.md, section 3, is why).
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from common.cli import add_common_args, run_main
from common.paths import step_dir
from step6_multimodal.images import draw, random_scene, to_tensor
from step6_multimodal.vision import load_vlm


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray, n_fit: int) -> float:
    means = {c: features[:n_fit][labels[:n_fit] == c].mean(0) for c in set(labels[:n_fit])}
    names = list(means)
    distances = np.stack([np.linalg.norm(features[n_fit:] - means[c], axis=1) for c in names], axis=1)
    return float(np.mean(np.array(names)[distances.argmin(1)] == labels[n_fit:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="vision-language model (default out/step6/vlm.pt)")
    parser.add_argument("--n", type=int, default=300, help="pictures (default 300)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    vlm = load_vlm(args.checkpoint or step_dir(6) / "vlm.pt")
    rng = np.random.default_rng(args.seed)
    scenes = [random_scene(rng, 1) for _ in range(args.n)]
    with torch.no_grad():
        vectors = vlm.image_features(torch.stack([to_tensor(draw(s)) for s in scenes]))
    # patch tokens: a shape can sit at any position, so keep each feature's largest value over them;
    # slots: which slot holds the shape is the point (slot i is the i-th colour), so keep them all
    pooled = (vectors.flatten(1) if vlm.vision_config.slots else vectors.max(dim=1).values).numpy()
    n_fit = 2 * args.n // 3
    result = {"colour": nearest_mean_accuracy(pooled, np.array([s[0].colour for s in scenes]), n_fit),
              "kind": nearest_mean_accuracy(pooled, np.array([s[0].kind for s in scenes]), n_fit),
              "image_vector_norm": float(vectors.norm(dim=-1).mean()),
              "token_embedding_norm": float(vlm.lm.tok_emb.weight.norm(dim=-1).mean())}
    print(f"colour read off the vectors: {100 * result['colour']:.0f} %, shape: {100 * result['kind']:.0f} %; "
          f"mean norm of an image vector {result['image_vector_norm']:.2f}, "
          f"of a token embedding {result['token_embedding_norm']:.2f}")
    return result


if __name__ == "__main__":
    run_main(main)
