"""Each CUDA op once at a small size, for compute-sanitizer (memcheck, racecheck, ...):

    compute-sanitizer --tool=memcheck --error-exitcode=1 python scripts/cuda_sanitizer_case.py

Head dims 8, 64 and 128 with k from 3 to 1024 (the select kernel's tiles and selection lists), limits and
chunks that cut row blocks, the label sums and readout, and the dual form's NaN/Inf check and GEMMs.
`--check` runs the same calls on the CPU instead: the script's own test where there is no GPU.
"""
import argparse

import torch

import metaclm_ext


def run(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    for dh, k in ((8, 3), (64, 100), (128, 1024)):
        history = torch.randint(-3, 4, (3000, 2 * dh), generator=g).half().to(device)
        queries = torch.randn(20, 2, dh, generator=g).to(device)
        limit = torch.randint(0, 3001, (20,), generator=g)
        metaclm_ext.history_topk(queries, history, k, limit=limit, chunk_rows=1111)
        labels = torch.randint(0, 5, (3000,), generator=g).to(device)
        metaclm_ext.history_label_mass(queries, history, labels, 5, chunk_rows=1111)
    metaclm_ext.dual_form_apply(*(torch.randn(*shape, generator=g).to(device) for shape in ((4, 16), (300, 16), (300, 8))))
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="run the calls on the CPU (no GPU needed)")
    args = parser.parse_args(argv)
    run("cpu" if args.check else "cuda")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
