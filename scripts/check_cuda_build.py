"""Check that the imported metaclm_ext._C is a CUDA build: every operator has a CUDA kernel. Needs no GPU.

    python scripts/check_cuda_build.py [--json PATH] [--allow-no-cuda]

Imports metaclm_ext (the dispatcher learns the operators from the extension's static registrations) and
asks the dispatcher, for each metaclm_ext operator, whether a kernel is registered for the CPU and for
CUDA. Exit status 1, naming what is missing, if torch is not a CUDA build, if an operator has no CUDA
kernel, or if the operators are not the three merge operators. `make cuda-build` and
scripts/device_check.sh run it after building; the latter's dry run passes --allow-no-cuda, which with a
CPU build of torch asks only for the CPU kernels.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import metaclm_ext

OPERATORS = ("history_topk_merge", "history_label_mass_merge", "dual_form_apply_merge")
NAMESPACE = "metaclm_ext::"


def registered_operators() -> list[str]:
    return sorted(name[len(NAMESPACE):] for name in torch._C._dispatch_get_all_op_names() if name.startswith(NAMESPACE))


def kernels(operator: str) -> dict[str, bool]:
    return {key: torch._C._dispatch_has_kernel_for_dispatch_key(NAMESPACE + operator, key) for key in ("CPU", "CUDA")}


def report() -> dict:
    found = registered_operators()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": metaclm_ext._C.__file__,
        "cuda_available": torch.cuda.is_available(),
        "operators": {name: kernels(name) for name in found},
    }


def problems(result: dict, allow_no_cuda: bool) -> list[str]:
    found = sorted(result["operators"])
    wrong = [] if found == sorted(OPERATORS) else [f"operators {found}, expected {sorted(OPERATORS)}"]
    cpu_only = result["torch_cuda"] is None
    if cpu_only and not allow_no_cuda:
        wrong.append(f"torch {result['torch']} is not a CUDA build")
    required = ("CPU",) if cpu_only and allow_no_cuda else ("CPU", "CUDA")
    return wrong + [f"{name} has no {key} kernel" for name, keys in result["operators"].items()
                    for key in required if not keys[key]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--allow-no-cuda", action="store_true",
                        help="with a CPU build of torch, check only the CPU kernels (a rehearsal without CUDA)")
    args = parser.parse_args(argv)
    result = report()
    result["problems"] = problems(result, args.allow_no_cuda)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if result["problems"]:
        print("check_cuda_build: FAILED: " + "; ".join(result["problems"]), file=sys.stderr)
        return 1
    kinds = "CPU kernels (torch has no CUDA)" if result["torch_cuda"] is None else "CPU and CUDA kernels"
    print(f"check_cuda_build: ok, {len(OPERATORS)} operators with {kinds} ({result['extension']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
