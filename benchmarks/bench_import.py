"""What the plugin adds to every interpreter start (`python -c pass`).

The .pth hook imports `mlx_vlm_qwen3vl._bootstrap`; this reports its cumulative
import time from `python -X importtime`, over repeated fresh interpreters,
next to the whole start-up time, as min / median.

    python benchmarks/bench_import.py [--runs 20]
"""

import argparse
import re
import statistics
import subprocess
import sys
import time


def bootstrap_import_us() -> int:
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True
    ).stderr
    for line in err.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+mlx_vlm_qwen3vl\._bootstrap$", line.strip())
        if match:
            return int(match.group(1))
    raise SystemExit("mlx_vlm_qwen3vl._bootstrap was not imported at start-up: is the plugin installed?")


def startup_s() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    plugin = [bootstrap_import_us() / 1000 for _ in range(runs)]
    total = [startup_s() * 1000 for _ in range(runs)]
    print(f"plugin activation at start-up: min {min(plugin):.2f} ms, median {statistics.median(plugin):.2f} ms")
    print(f"whole `python -c pass`:        min {min(total):.1f} ms, median {statistics.median(total):.1f} ms")
    print(f"share of start-up:             {statistics.median(plugin) / statistics.median(total):.1%}")


if __name__ == "__main__":
    main()
