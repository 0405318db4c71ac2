"""GPU benchmark of the CUDA history kernels, against the device's own limits measured in the same run.

    python scripts/bench_cuda.py [--quick | --smoke] [--out DIR]

Measures, on one device: the device-to-device copy bandwidth (a large tensor copy, bytes read + written
per second), the pinned host-to-device bandwidth and the fp32 matrix rate (a large fp32 matmul with TF32
off: the CUDA-core peak the kernels' fp32 scoring can reach). Then, at the paper's shapes (Q = 200
queries, attention histories of H = 8 heads of Dh = 8 and FFN histories of D = 128, fp16, k = 10) with
10^7 and 10^8 rows resident in device memory: history_topk (top-k and last-k in one pass) against
chunked torch matmul + topk on the same data, as history bytes per second, the fraction of the copy
bandwidth and of the fp32 rate it reaches, the fraction of its limit (max of bytes / copy bandwidth and
flops / fp32 rate) and the speedup over torch; faiss.knn_gpu where faiss has GPU support;
history_label_mass. Last, history_topk streamed from a history in host RAM through pinned buffers
(TensorRows) against the pinned host-to-device bandwidth.

The JSON (one file under --out) is rewritten after every step, so a run cut short keeps what it measured;
a step that fails records its error and the run goes on. Without a CUDA device it says so and exits 0;
--smoke runs every step once at tiny sizes on whatever device there is (the CPU here), which checks the
script itself before a GPU run and measures nothing of meaning.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import torch

import metaclm_ext
from metaclm_ext.baselines import torch_topk  # the same chunked baseline as the CPU table
from metaclm_ext.ops import TensorRows

K = 10
QUERIES = 200
# (name, H, Dh): the paper's attention and FFN histories.
LAYOUTS = [("attn-8x8", 8, 8), ("ffn-1x128", 1, 128)]
ROWS = {"full": [10**7, 10**8], "quick": [10**6, 10**7], "smoke": [3000]}
STREAM_ROWS = {"full": 10**7, "quick": 10**6, "smoke": 3000}
# Sizes of the limit measurements: far past the L2 cache (50 MB on an H100) and long enough to time.
LIMIT_SIZES = {"full": dict(copy=2 << 30, h2d=1 << 30, gemm=8192), "smoke": dict(copy=1 << 20, h2d=1 << 20, gemm=256)}


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    """Median seconds of fn() over `repeat` runs after one warm-up; CUDA events on a GPU."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def copy_gbps(device, nbytes: int) -> float:
    """Device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device) / 1e9


def h2d_gbps(device, nbytes: int) -> float:
    """Host-to-device bandwidth from pinned memory (on the CPU: a copy between two host buffers)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / timed(lambda: dst.copy_(src, non_blocking=True), device) / 1e9


def fp32_gflops(device, n: int) -> float:
    """fp32 matrix rate with TF32 off (full fp32 arithmetic, as the kernels' scoring)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device) / 1e9


def faiss_topk(queries, history, k):
    """A function running faiss exact inner-product search per head, twice (top; last via negated
    queries), or a string saying why there is none."""
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in faiss calls)
    except ImportError as exc:
        return f"faiss not importable: {exc}"
    if not hasattr(faiss, "StandardGpuResources"):
        return "faiss has no GPU support (faiss-cpu installed)"
    res = faiss.StandardGpuResources()
    q, h, dh = queries.shape
    heads = [history.view(-1, h, dh)[:, i].contiguous() for i in range(h)]  # faiss wants dense [N, Dh]
    signed = [[(s * queries[:, i]).half().contiguous() for s in (1, -1)] for i in range(h)]

    def run():
        for i in range(h):
            for xq in signed[i]:
                faiss.knn_gpu(res, xq, heads[i], k, metric=faiss.METRIC_INNER_PRODUCT)

    return run


def random_rows(n: int, width: int, device) -> torch.Tensor:
    """fp16 rows of N(0, 1), drawn a block at a time so no fp32 copy of the whole history is made."""
    out = torch.empty(n, width, dtype=torch.float16, device=device)
    block = 1 << 22
    for start in range(0, n, block):
        out[start : start + block].normal_()
    return out


def resident_case(name, h, dh, n, limits, device) -> dict:
    """history_topk and its baselines on a history in device memory."""
    history = random_rows(n, h * dh, device)
    queries = torch.randn(QUERIES, h, dh, device=device)
    labels = torch.randint(0, 64, (n,), device=device)
    nbytes, flops = history.numel() * history.element_size(), 2.0 * history.numel() * QUERIES
    ours = metaclm_ext.history_topk(queries, history, K)
    (_, base_top_idx), _ = torch_topk(queries, history, K)
    case = {"name": name, "Q": QUERIES, "H": h, "Dh": dh, "N": n, "k": K, "dtype": "float16",
            "history_bytes": nbytes, "flops": flops,
            # Sanity: rows picked by both (ties and fp rounding may reorder near-equal scores).
            "top_index_agreement_with_torch": float((ours.top.indices == base_top_idx).float().mean())}
    case["topk_s"] = timed(lambda: metaclm_ext.history_topk(queries, history, K), device)
    case["torch_matmul_topk_s"] = timed(lambda: torch_topk(queries, history, K), device, repeat=1 if n >= 10**8 else 3)
    case["label_mass_s"] = timed(lambda: metaclm_ext.history_label_mass(queries, history, labels, 64), device)
    faiss_run = faiss_topk(queries, history, K) if device.type == "cuda" else "no GPU"
    try:
        case["faiss_knn_gpu_top_and_last_s"] = timed(faiss_run, device) if callable(faiss_run) else faiss_run
    except Exception as exc:  # recorded, not fatal: the other numbers of the run still stand
        case["faiss_knn_gpu_top_and_last_s"] = f"faiss failed: {exc}"
    limit_s = max(nbytes / (limits["copy_gbps_read_plus_write"] * 1e9), flops / (limits["fp32_gflops"] * 1e9))
    case.update({
        "topk_gbps": nbytes / case["topk_s"] / 1e9,
        "topk_fraction_of_copy": nbytes / case["topk_s"] / 1e9 / limits["copy_gbps_read_plus_write"],
        "topk_fraction_of_fp32": flops / case["topk_s"] / 1e9 / limits["fp32_gflops"],
        "topk_limit_s": limit_s,
        "topk_fraction_of_limit": limit_s / case["topk_s"],
        "topk_speedup_over_torch": case["torch_matmul_topk_s"] / case["topk_s"],
        "label_mass_gbps": nbytes / case["label_mass_s"] / 1e9,
    })
    return case


def streaming_case(name, h, dh, n, limits, device) -> dict:
    """history_topk of a history in host RAM (as a store in the page cache), staged through pinned buffers."""
    host = random_rows(n, h * dh, "cpu")
    queries = torch.randn(QUERIES, h, dh, device=device)
    seconds = timed(lambda: metaclm_ext.history_topk(queries, TensorRows(host), K), device, repeat=2)
    gbps = host.numel() * host.element_size() / seconds / 1e9
    return {"case": name, "N": n, "seconds": seconds, "gbps": gbps,
            "fraction_of_h2d_pinned": gbps / limits["h2d_pinned_gbps"]}


class Results:
    """The run's JSON, rewritten after every step."""

    def __init__(self, path: str, header: dict):
        self.path, self.data = path, dict(header, limits={}, cases=[], errors=[])

    def step(self, what: str, fn) -> object:
        print(f"bench_cuda: {what}", flush=True)
        try:
            return fn()
        except Exception as exc:  # recorded, and the remaining steps still run
            traceback.print_exc()
            self.data["errors"].append({"step": what, "error": f"{type(exc).__name__}: {exc}"})
            return None
        finally:
            if self.data["device"].startswith("cuda"):
                torch.cuda.empty_cache()
            self.save()

    def save(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="histories 10x shorter")
    size.add_argument("--smoke", action="store_true",
                      help="every step once at tiny sizes, on the CPU where there is no GPU (checks the script)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks",
                                                      "results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_cuda: skipped, no CUDA device")
        return 0
    scale = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 rate is the kernels' (full fp32) arithmetic
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.makedirs(args.out, exist_ok=True)
    slug = name.replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"bench_cuda-{slug}-{when[:10]}{'-' + scale if scale != 'full' else ''}.json")
    results = Results(path, {"device": f"{device.type}: {name}", "torch": torch.__version__, "cuda": torch.version.cuda,
                             "when": when, "scale": scale})
    sizes = LIMIT_SIZES["smoke" if args.smoke else "full"]
    limits = results.data["limits"]
    limits["copy_gbps_read_plus_write"] = results.step("copy bandwidth", lambda: copy_gbps(device, sizes["copy"]))
    limits["h2d_pinned_gbps"] = results.step("pinned H2D bandwidth", lambda: h2d_gbps(device, sizes["h2d"]))
    limits["fp32_gflops"] = results.step("fp32 matmul rate", lambda: fp32_gflops(device, sizes["gemm"]))
    if any(value is None for value in limits.values()):
        print("bench_cuda: a limit could not be measured; the cases need all three", file=sys.stderr)
        return 1
    for layout, h, dh in LAYOUTS:
        for n in ROWS[scale]:
            case = results.step(f"{layout} N={n:.0e} resident", lambda: resident_case(layout, h, dh, n, limits, device))
            if case is not None:
                results.data["cases"].append(case)
    layout, h, dh = LAYOUTS[0]
    results.data["streaming"] = results.step(
        f"{layout} N={STREAM_ROWS[scale]:.0e} streamed",
        lambda: streaming_case(layout, h, dh, STREAM_ROWS[scale], limits, device))
    results.save()
    print(json.dumps(results.data, indent=2))
    print(f"wrote {path}")
    return 1 if results.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
