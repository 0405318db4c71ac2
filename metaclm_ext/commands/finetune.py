"""`metaclm finetune`: fine-tune a packaged pretrained causal LM with plain SGD, recording its training history."""
from __future__ import annotations

import argparse

from ..finetune import FinetuneConfig, finetune
from ..probe.models import PACKAGED

DEFAULTS = FinetuneConfig(out="")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained LM with plain SGD, recording every layer's history")
    p.add_argument("--out", required=True, help="run folder to create (finetune.json, history/, checkpoints/, ...)")
    p.add_argument("--model", default=DEFAULTS.model,
                   help=f"packaged model ({', '.join(PACKAGED)}) or a local model folder with its tokenizer "
                        f"(default {DEFAULTS.model})")
    p.add_argument("--corpus", default=DEFAULTS.corpus,
                   help="wikipedia (gensim sample; the article is the label), news (Lee corpus; the story is the "
                        "label), a text file (a document = a blank-line-separated paragraph) or a folder (a "
                        f"document = a file); default {DEFAULTS.corpus}")
    p.add_argument("--tokens", type=int, default=DEFAULTS.tokens,
                   help=f"trained tokens (= history rows), rounded up to whole steps (default {DEFAULTS.tokens:,})")
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help=f"positions per sequence (default {DEFAULTS.seq_len})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help=f"sequences per step (default {DEFAULTS.batch_size})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"SGD learning rate (default {DEFAULTS.lr:g})")
    p.add_argument("--clip", type=float, default=None, help="clip the gradient norm to this (default: no clipping)")
    p.add_argument("--layers", default=DEFAULTS.layers,
                   help="layers recorded into history/ in --dtype: all, none or e.g. 0,mid,-1 (default all)")
    p.add_argument("--fp32-layers", default=DEFAULTS.fp32_layers,
                   help="layers recorded again, in float32, into history-fp32/ for the exactness check; their "
                        "projections train with float64 weights so that float32 rounding does not blur the change "
                        f"(default {DEFAULTS.fp32_layers}: first, middle, last; none to skip)")
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=("float16", "bfloat16", "float32"),
                   help=f"float type of history/ (default {DEFAULTS.dtype})")
    p.add_argument("--checkpoints", type=int, default=DEFAULTS.checkpoints,
                   help=f"checkpoints kept for the analysis, evenly spaced from the start (default {DEFAULTS.checkpoints})")
    p.add_argument("--heldout-sentences", type=int, default=DEFAULTS.heldout_sentences,
                   help=f"sentences held out of training per document (default {DEFAULTS.heldout_sentences})")
    p.add_argument("--document-tokens", type=int, default=DEFAULTS.document_tokens,
                   help=f"at most this many tokens of each document are trained on (default {DEFAULTS.document_tokens})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(out=args.out, model=args.model, corpus=args.corpus, tokens=args.tokens, seq_len=args.seq_len,
                         batch_size=args.batch_size, lr=args.lr, clip=args.clip, layers=args.layers,
                         fp32_layers=args.fp32_layers, dtype=args.dtype, checkpoints=args.checkpoints,
                         heldout_sentences=args.heldout_sentences, document_tokens=args.document_tokens, seed=args.seed)
    s = finetune(cfg, progress=not args.no_progress)
    gb = sum(s["bytes"].values()) / 1e9
    print(f"model: {s['model']['description']}\ncorpus: {s['corpus']['description']} "
          f"({s['corpus']['documents_trained']} {s['corpus']['label']}s trained, {s['corpus']['epochs']:.2f} epochs)")
    print(f"{s['tokens']:,} tokens in {s['steps']} steps, {s['wall_seconds']['total'] / 60:.1f} min "
          f"({s['tokens_per_second']:.1f} tokens/s); loss {s['losses'][0]:.3f} -> {s['losses'][-1]:.3f}")
    print("history: " + ", ".join(f"{name}/ {s['rows'][name]:,} rows, {s['bytes'][name] / 1e9:.2f} GB "
                                  f"({info['dtype']}, {len(info['layers'])} layers)"
                                  for name, info in s["stores"].items()) + f"; {gb:.2f} GB in all")
    print(f"wrote {args.out}")
    return 0
