"""Every CPU benchmark, one after the other, each writing benchmarks/results/<name>.json.

    python -m benchmarks.run_all [--threads 1] [--out DIR]

About 10 minutes on 2 busy cores. Where a CUDA device is visible the GPU check runs too;
elsewhere run it on a GPU machine: `python -m benchmarks.gpu_check --out DIR`.
"""

from __future__ import annotations

import time

import torch

from benchmarks import cli_startup, common, gpu_check, loader, sweep_overhead, throughput


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    out = ["--out", str(args.out)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    runs = [
        ("loader", loader.main, out + threads),
        ("throughput", throughput.main, out + threads),
        ("sweep_overhead", sweep_overhead.main, out),  # workers pick their own threads
        ("cli_startup", cli_startup.main, out),
    ]
    if torch.cuda.is_available():
        runs.append(("gpu_check", gpu_check.main, out))
    t0 = time.perf_counter()
    for name, main_fn, argv_ in runs:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        main_fn(argv_)
        print(f"== {name}: {time.perf_counter() - t:.0f} s", flush=True)
    print(f"all benchmarks: {time.perf_counter() - t0:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
