"""fp32 against bf16 matmul speed on this CPU, and whether it computes bf16 natively (AVX512-BF16 or AMX).

Where it does not, torch emulates bf16 and ``ijepa.device.autocast`` keeps CPU stages in fp32. Prints medians
of 5 timed runs and their ratio, measured side by side.

    python benchmarks/bench_matmul.py [--size 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ijepa.device import cpu_has_native_bf16


def gflops(dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    n = ap.parse_args().size
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    fp32, bf16 = gflops(torch.float32, n), gflops(torch.bfloat16, n)
    print(
        f"{n}^3 matmul  fp32 median {fp32:8.1f} GFLOP/s   bf16 median {bf16:8.1f} GFLOP/s   "
        f"bf16/fp32 {bf16 / fp32:.3f}x"
    )


if __name__ == "__main__":
    main()
