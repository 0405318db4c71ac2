"""`metaclm probe`: Sections 6, 8.1 and Appendix B on a pretrained causal LM, offline."""
from __future__ import annotations

import argparse

from . import out_folder
from ..probe import norm_drops_report
from ..probe.norm_drops_run import run_norm_drops
from ..probe.report import write_outputs
from ..probe.run import ProbeConfig, run_probe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="inner loss, norms, PCA trajectories and Appendix B on a pretrained causal LM")
    p.add_argument("--model", required=True,
                   help="smollm2, gemma3-270m (packaged GGUFs), gpt2 or any local folder / locally cached hub name")
    p.add_argument("--corpus", required=True,
                   help="wikipedia or news (gensim stand-ins for Wikitext-103 / 1BW), or a text file / folder "
                        "(one sample per line)")
    p.add_argument("--out", type=out_folder, required=True, help="output folder (results.json, PNGs, summary.md)")
    p.add_argument("--max-samples", type=int, default=None, help="random subset of at most N samples (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128, help="truncate samples to this many tokens (default 128)")
    p.add_argument("--pca-samples", type=int, default=50, help="trajectories drawn in the PCA plot (paper: 50 for GPT-2)")
    p.add_argument("--linear-samples", type=int, default=50, help="samples for Appendix B (GPT-2 design only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--explain-norms", action="store_true",
                   help="also explain Table 1 on the same tokens: per-step norm drops, attention vs MLP, dominant "
                        "residual dimensions, tolerance curve, norms without the top dimensions (norm_drops.*)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = ProbeConfig(args.model, args.corpus, args.max_samples, args.batch_size, args.max_tokens,
                      args.pca_samples, args.linear_samples, args.seed, args.device)
    result = run_probe(cfg)
    files = write_outputs(result, args.out)
    n, one, t1 = result["counts"], result["norms"]["per_sample"]["table1"], result["norms"]["table1"]
    print(f"model: {result['model']['description']}\ncorpus: {result['corpus']['description']}")
    print(f"kept {n['kept_after_loss_filter']}/{n['sampled']} samples")
    for curve in (result["inner_loss_head_only"], result["inner_loss"]):
        print(f"inner loss, {curve['label']}: embeddings {curve['first']:.3f}, layer 1 {curve['layer1']:.3f}, "
              f"last layer {curve['last']:.3f} nats; Spearman rho over layers 1..L {curve['trend_rho']:.2f}")
    print(f"non-decreasing norms (last layer excluded): one per sample {one['sequence_percent']:.1f}% sequences, "
          f"{one['pair_percent']:.1f}% pairs; every studied token {t1['sequence_percent']:.1f}% / "
          f"{t1['pair_percent']:.1f}%")
    if result["linear"]["applicable"]:
        print(f"Appendix B: Proposition 1 holds for {result['linear']['satisfied_percent']:.1f}% of "
              f"{result['linear']['pairs']} (sample, layer) pairs")
    print(f"wrote {', '.join(sorted(files.values()))} to {args.out} in {result['seconds']:.1f} s")
    if args.explain_norms:
        drops = run_norm_drops(cfg)
        written = norm_drops_report.write_outputs(drops, args.out)
        worst = drops["worst_steps"][0]
        removal = ", ".join(f"without {len(r['dims'])} ({' '.join(map(str, r['dims']))}): {r['sequence_percent']:.1f}% / "
                            f"{r['pair_percent']:.1f}%" for r in drops["removal"] if r["dims"])
        print(f"norm drops: worst step {worst['from_state']} -> {worst['to_state']} keeps "
              f"{worst['nondecreasing_percent']:.1f}% of tokens (cause: {worst['cause'] or 'none drops'}); top dimension "
              f"{drops['dominant_dims']['ranking'][0]['dim']}; sequence / pair {removal}")
        print(f"wrote {', '.join(sorted(written.values()))} to {args.out} in {drops['seconds']:.1f} s")
    return 0
