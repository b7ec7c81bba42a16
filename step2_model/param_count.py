"""Where do the parameters of the model live? Count them by part, beside the formula.

    python step2_model/param_count.py                      # the default ModelConfig
    python step2_model/param_count.py --quick              # the --quick run's model (common.model.QUICK_CONFIG)
    python step2_model/param_count.py --n_embd 256 --n_head 8 --n_kv_head 4 --vocab_size 4096
    python step2_model/param_count.py --tie_embeddings false

Prints one row per part (embedding, attention, ffn, norms, lm_head): the
closed-form formula with the numbers plugged in, its value, and the count
measured on a real model. The two columns must agree. Then it shows what two
design choices save: grouped-query attention (fewer key/value heads) and
weight tying (the output layer reuses the embedding matrix).
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dataclasses import replace

from common.cli import add_common_args, add_model_args, config_from_args, run_main
from common.metrics import write_metrics
from common.model import QUICK_CONFIG, Transformer, kv_cache_bytes
from step2_model.inspect_model import count_parameters, param_formula

PARTS = ("embedding", "attention", "ffn", "norms", "lm_head")


def formula_texts(cfg) -> dict:
    """Each part's formula with this config's numbers written in."""
    V, C, L, d, H = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.head_dim, cfg.ffn_hidden_size()
    return {
        "embedding": f"V*C = {V}*{C}",
        "attention": (f"L*(2*C*n_head*d + 2*C*n_kv_head*d) = {L}*(2*{C}*{cfg.n_head}*{d} + 2*{C}*{cfg.n_kv_head}*{d})"
                      + (f" + L*n_kv_head = {L}*{cfg.n_kv_head}" if cfg.smear_keys else "")),
        "ffn": f"L*3*C*H = {L}*3*{C}*{H}",
        "norms": f"(2*L+1)*C = {2 * L + 1}*{C}",
        "lm_head": "0 (tied to the embedding)" if cfg.tie_embeddings else f"V*C = {V}*{C}",
    }


def parameter_table(cfg) -> tuple[str, dict, dict]:
    """(printable table, formula counts, measured counts) for one config."""
    formula, measured = param_formula(cfg), count_parameters(Transformer(cfg))
    texts = formula_texts(cfg)
    width = max(len(t) for t in texts.values())
    lines = [f"{'part':<10} {'formula':<{width}} {'formula':>11} {'measured':>11} {'share':>6}"]
    for part in PARTS:
        share = measured[part] / measured["total"]
        lines.append(f"{part:<10} {texts[part]:<{width}} {formula[part]:>11,} {measured[part]:>11,} {share:>6.1%}")
    lines.append(f"{'total':<10} {'':<{width}} {formula['total']:>11,} {measured['total']:>11,}")
    return "\n".join(lines), formula, measured


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:  # the quick run's model (the report card shows that run's figures); flags given still win
        parser.set_defaults(**QUICK_CONFIG.to_dict())
        args = parser.parse_args(argv)
    cfg = config_from_args(args)

    print(f"ModelConfig: {cfg.to_dict()}")
    print(f"head_dim d = n_embd/n_head = {cfg.head_dim}, ffn hidden H = {cfg.ffn_hidden_size()}\n")
    table, formula, measured = parameter_table(cfg)
    print(table)

    # What the design choices save, measured on models that differ in one setting only.
    mha = replace(cfg, n_kv_head=cfg.n_head)
    untied = replace(cfg, tie_embeddings=False)
    mha_attention = count_parameters(Transformer(mha))["attention"]
    untied_total = count_parameters(Transformer(untied))["total"]
    cache_gqa = kv_cache_bytes(cfg, cfg.block_size)
    cache_mha = kv_cache_bytes(mha, cfg.block_size)
    print(f"\nGQA: {cfg.n_kv_head} key/value heads for {cfg.n_head} query heads. Attention has "
          f"{measured['attention']:,} parameters; with n_kv_head={cfg.n_head} (plain multi-head) "
          f"it would have {mha_attention:,}.")
    print(f"     KV cache for {cfg.block_size} tokens (float32): {cache_gqa / 2**10:,.0f} KiB instead of "
          f"{cache_mha / 2**10:,.0f} KiB ({cfg.n_head // cfg.n_kv_head}x less).")
    if cfg.tie_embeddings:
        print(f"Tying: untied, the model would have {untied_total:,} parameters "
              f"(+{untied_total - measured['total']:,}, a second {cfg.vocab_size}x{cfg.n_embd} matrix).")
    result = {"config": cfg.to_dict(), "formula": formula, "measured": measured,
              "mha_attention": mha_attention, "untied_total": untied_total,
              "kv_cache_bytes": cache_gqa, "kv_cache_bytes_mha": cache_mha}
    write_metrics(2, {"total": measured["total"], "by_part": {p: measured[p] for p in PARTS},
                      "formula_matches": formula == measured}, section="params")
    return result


if __name__ == "__main__":
    run_main(main)
