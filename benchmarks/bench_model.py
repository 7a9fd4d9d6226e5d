"""Qwen3-VL speed, side by side: this plugin vs mlx-vlm's built-in qwen3_vl vs transformers.

All backends load the same seeded random-weight checkpoint (built once and cached). Each runs in
its own subprocess, one after the other, so peak memory is per backend and two heavy workers never
share the cores. The headline is the ratio plugin/builtin and plugin/transformers per figure.

    python benchmarks/bench_model.py --shape tiny
    python benchmarks/bench_model.py --shape 2b --quant none,4 --repeats 1 --decode-tokens 16 --markdown

See benchmarks/README.md for what each figure means and the CPU caveats.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_workers  # noqa: E402

BACKENDS = ("plugin", "plugin+openblas", "builtin", "transformers")
# plugin+openblas: the plugin with the opt-in fast BLAS (MLX_VLM_QWEN3VL_BLAS=openblas; Linux CPU,
# Debian's libopenblas0-pthread). Its gains exist only on MLX's CPU backend.
BLAS_ENV = "MLX_VLM_QWEN3VL_BLAS"
FIGURES = ("vision", "prefill", "decode")
DISABLE_ENV = "MLX_VLM_QWEN3VL_DISABLE"
CACHE_ROOT = Path("~/.cache/mlx-vlm-qwen3vl/bench").expanduser()

# Seconds on the 2-core x86 CPU of benchmarks/README.md for mlx-vlm's built-in model at the 2B
# shape in bfloat16 (shared/notes/mlx-cpu-performance.md): vision per 448x448 image, prefill and
# decode per token. Other shapes scale by parameter count; only used for the up-front estimate.
COST_2B = {"vision_448": 82.0, "prefill": 1 / 2.7, "decode": 1 / 0.94, "decode_q": 1 / 0.12, "prefill_q": 5.0}
PARAMS_2B = 2.1e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", help="builder shape: tiny, 2b, 4b, 8b, 32b")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the shape's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", default="none", help="comma list of none, 4, 8 (e.g. none,4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", choices=("small", "full", "none"), default="small",
                   help="before timing each figure: run it once on a small input (default), "
                        "on the real input, or not at all")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--vision-sizes", default="448,896,4x448",
                   help="comma list; 448 = one 448x448 image, 4x448 = four in one call")
    p.add_argument("--only", default=",".join(FIGURES), help="comma list of vision, prefill, decode")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, default=None, help="use this checkpoint instead of building one")
    p.add_argument("--cache-dir", type=Path, default=CACHE_ROOT)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--markdown", action="store_true", help="also print a README-ready markdown table")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="table from wall seconds (default) or process CPU seconds (work, not speed: "
                        "the plugin and torch use several cores, the built-in one)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="print the tables of an earlier --json file instead of measuring")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.quant = _choices(args.quant, ("none", "4", "8"), "--quant")
    args.only = _choices(args.only, FIGURES, "--only")
    args.backends = _choices(args.backends, BACKENDS, "--backends")
    args.vision_sizes = [s.strip() for s in args.vision_sizes.split(",") if s.strip()]
    for name, value in (("--repeats", args.repeats), ("--decode-tokens", args.decode_tokens),
                        ("--prefill-tokens", args.prefill_tokens)):
        if value < 1:
            p.error(f"{name} must be at least 1")
    return args


def _choices(text, allowed, flag):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: {', '.join(bad) or 'nothing given'} not in {', '.join(allowed)}")
    return items


# ------------------------------------------------------------------ checkpoints
def bf16_checkpoint(args) -> Path:
    if args.checkpoint is not None:
        return args.checkpoint
    from mlx_vlm_qwen3vl.builder import SHAPES, build_checkpoint

    dtype = args.dtype or SHAPES[args.shape].default_dtype
    out = args.cache_dir / f"{args.shape}-{dtype}-seed{args.seed}"
    if not _cached_build_is_current(out, args.shape, dtype, args.seed):
        for stale in out.glob("*.safetensors*"):
            stale.unlink()
        say(f"building {args.shape} {dtype} checkpoint in {out} ...")
        start = time.perf_counter()
        build_checkpoint(out, shape=args.shape, seed=args.seed, dtype=dtype)
        say(f"  built in {time.perf_counter() - start:.0f} s")
    return out


def _cached_build_is_current(out: Path, shape, dtype, seed) -> bool:
    """A cached checkpoint is reused only if the builder would still write the
    same config (shapes change while the builder evolves)."""
    from mlx_vlm_qwen3vl.builder import metadata
    from mlx_vlm_qwen3vl.builder.shapes import resolve

    config = out / "config.json"
    if not config.is_file() or not list(out.glob("*.safetensors")):
        return False
    expected = json.loads(json.dumps(metadata.model_config(resolve(shape), dtype, seed)))
    return json.loads(config.read_text()) == expected


def quantized_checkpoint(source: Path, bits: str) -> Path:
    """Converted once with the host's converter (the built-in model class, so
    the weights are the host's layout) and reused."""
    out = source.with_name(f"{source.name}-q{bits}")
    weights = [p.stat().st_mtime for p in source.glob("*.safetensors")]
    if (out / "config.json").is_file() and (out / "config.json").stat().st_mtime > max(weights):
        return out
    say(f"converting to {bits}-bit with mlx_vlm convert into {out} ...")
    cmd = [sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(source),
           "--mlx-path", str(out), "-q", "--q-bits", bits]
    subprocess.run(cmd, check=True, env={**os.environ, DISABLE_ENV: "1"})
    return out


# ------------------------------------------------------------------ estimate
def estimate_seconds(args, params, quant) -> float:
    scale = params / PARAMS_2B
    if args.dtype == "float32":
        scale *= 1.5
    vision_images = sum(count * (side / 448) ** 2 for _, count, side in model_workers.vision_cases(args.vision_sizes))
    runs = args.repeats + (1 if args.warmup == "full" else 0)
    prefill = COST_2B["prefill_q" if quant != "none" else "prefill"]
    decode = COST_2B["decode_q" if quant != "none" else "decode"]
    total = 0.0
    if "vision" in args.only:
        total += runs * vision_images * COST_2B["vision_448"]
    if "prefill" in args.only:
        total += runs * (args.prefill_tokens * prefill + COST_2B["vision_448"] + 220 * prefill)
    if "decode" in args.only:
        total += runs * (args.decode_tokens * decode + 16 * prefill)
    return total * scale


# ------------------------------------------------------------------ workers
def run_worker(args, backend, path, quant) -> dict:
    if backend == "transformers" and quant != "none":
        return {"backend": backend, "unavailable": "n/a: transformers has no MLX-quantized weights"}
    spec = {
        "backend": backend, "path": str(path), "only": args.only, "repeats": args.repeats,
        "warmup": args.warmup, "decode_tokens": args.decode_tokens, "prefill_tokens": args.prefill_tokens,
        "vision_sizes": args.vision_sizes, "seed": args.seed, "torch_threads": args.torch_threads,
    }
    env = dict(os.environ)
    env.pop(BLAS_ENV, None)
    if backend == "builtin":
        env[DISABLE_ENV] = "1"
    else:
        env.pop(DISABLE_ENV, None)
    if backend == "plugin+openblas":
        env[BLAS_ENV] = "openblas"
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        spec["result_file"] = str(result_file)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        tail = []
        for line in proc.stderr:
            tail = (tail + [line])[-40:]
            if line.strip() and "Loading weights" not in line:
                print(f"    | {line.rstrip()}", flush=True)
        if proc.wait() or not result_file.is_file():
            return {"backend": backend, "unavailable": _last_error("".join(tail))}
        return json.loads(result_file.read_text())


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.strip()[:300]
    return (lines[-1] if lines else "worker failed without output")[:300]


def worker_main(spec_json: str):
    spec = json.loads(spec_json)
    try:
        result = model_workers.run(spec)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1)
    if spec["backend"] == "plugin+openblas":
        from mlx_vlm_qwen3vl import cpu_blas

        if cpu_blas.loaded_library is None:
            print("RuntimeError: OpenBLAS was not preloaded (apt-get install libopenblas0-pthread)",
                  file=sys.stderr)
            raise SystemExit(1)
    Path(spec["result_file"]).write_text(json.dumps(result))
    if spec["backend"].startswith("plugin") and result["model_class"].startswith("mlx_vlm.models."):
        print("warning: 'plugin' backend loaded mlx-vlm's built-in class; is the plugin installed?",
              file=sys.stderr)


# ------------------------------------------------------------------ report
FIGURE_ROWS = (
    # key, label, unit ("s": seconds, lower is better; "tok/s": higher is better)
    ("vision_448", "vision, 1 image 448x448", "s"),
    ("vision_896", "vision, 1 image 896x896", "s"),
    ("vision_4x448", "vision, 4 images 448x448", "s"),
    ("prefill_text", "prefill, text", "tok/s"),
    ("prefill_image", "prefill, 448x448 image + text", "tok/s"),
    ("decode", "decode (greedy)", "tok/s"),
)


def figure_rows(results, clock="wall"):
    """Rows of (key, label, unit, {backend: (best, median, work)}) for figures any backend has."""
    keys = {key for r in results.values() for key in r.get("figures", {})}
    rows = [(k, label, unit) for k, label, unit in FIGURE_ROWS if k in keys]
    rows += [(k, k, "s") for k in sorted(keys) if k not in {r[0] for r in FIGURE_ROWS}]
    table = []
    for key, label, unit in rows:
        cells = {}
        for name, r in results.items():
            fig = r.get("figures", {}).get(key)
            times = fig and (fig.get("cpu_times") if clock == "cpu" else fig["times"])
            if not times:
                continue
            best, median = min(times), statistics.median(times)
            if unit == "tok/s":
                cells[name] = (fig["work"] / best, fig["work"] / median, fig["work"])
            else:
                cells[name] = (best, median, None)
        table.append((key, label, unit, cells))
    return table


def speedup(unit, ours, other):
    """How many times faster the plugin is (>1 = plugin faster), from medians."""
    if ours is None or other is None:
        return None
    return ours[1] / other[1] if unit == "tok/s" else other[1] / ours[1]


def fmt_value(unit, cell):
    if cell is None:
        return "-"
    best, median, _ = cell
    text = f"{median:.3g}" + (" s" if unit == "s" else "")
    if f"{best:.3g}" != f"{median:.3g}":
        text += f" ({'best' if unit == 'tok/s' else 'min'} {best:.3g})"
    return text


def fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def variant_table(results, bw, markdown=False, clock="wall"):
    names = [b for b in BACKENDS if b in results]
    others = [b for b in ("builtin", "transformers") if "figures" in results.get(b, {})]
    ours = [b for b in names if b.startswith("plugin") and "figures" in results[b]]
    pairs = [(mine, other) for mine in ours for other in others]
    header = ["figure"] + names + [f"{mine}/{other}" for mine, other in pairs]
    rows = []
    for key, label, unit, cells in figure_rows(results, clock):
        label = f"{label} [{unit}]" + (f", {int(next(iter(cells.values()))[2])} tok" if unit == "tok/s" and cells else "")
        row = [label] + [fmt_value(unit, cells.get(n)) for n in names]
        row += [fmt_ratio(speedup(unit, cells.get(mine), cells.get(other))) for mine, other in pairs]
        rows.append(row)
    pad = [""] * len(pairs)
    rows += [row + pad for row in roofline_rows(results, names, bw) + memory_rows(results, names)]
    rows.append(["worker CPU s / wall s, load avg (contention check)"]
                + [_contention(results[n]) for n in names] + pad)
    for name in names:
        if "unavailable" in results[name]:
            rows.append([f"{name}: unavailable"] + [results[name]["unavailable"] if n == name else "" for n in names] + pad)
    return render(header, rows, markdown)


def roofline_rows(results, names, bandwidth):
    """The roofline at the best read bandwidth, and the fraction of it each
    backend's decode reaches; also the fraction at the best read in 4 KB pages
    (what the probe measured before it tried huge pages, see model_workers.bandwidth)."""
    rows = []
    per_token = {n: r.get("lm_bytes_per_token") for n, r in results.items() if r.get("lm_bytes_per_token")}
    if not per_token or not bandwidth:
        return rows
    roof = {n: bandwidth["bytes_per_s"] / b for n, b in per_token.items()}
    rows.append(["decode roofline [tok/s] (bandwidth / LM weight bytes per token)"]
                + [f"{roof[n]:.3g} ({per_token[n] / 1e9:.3g} GB/tok)" if n in roof else "-" for n in names])
    tok_s = {}
    for n in names:
        fig = results[n].get("figures", {}).get("decode")
        if fig and n in roof:
            tok_s[n] = fig["work"] / statistics.median(fig["times"])
    if not tok_s:
        return rows
    rows.append(["decode, fraction of roofline"] + [f"{tok_s[n] / roof[n]:.1%}" if n in tok_s else "-" for n in names])
    if bandwidth.get("bytes_per_s_4k"):
        roof_4k = {n: bandwidth["bytes_per_s_4k"] / b for n, b in per_token.items()}
        rows.append(["decode, fraction of the roofline at 4 KB-page bandwidth"]
                    + [f"{tok_s[n] / roof_4k[n]:.1%}" if n in tok_s else "-" for n in names])
    return rows


def memory_rows(results, names):
    def gb(value):
        return "-" if not value else f"{value / 1e9:.2f} GB"

    mem = {n: results[n].get("memory", {}) for n in names}
    rows = [["peak MLX memory (mx.get_peak_memory; without the plugin's huge-page weights)"]
            + [gb(mem[n].get("peak_bytes")) for n in names],
            ["peak RSS (ru_maxrss)"] + [gb(mem[n].get("maxrss_bytes")) for n in names],
            ["load [s] (plugin: with moving the LM weights into huge pages)"]
            + [f"{results[n]['load_s']:.1f}" if "load_s" in results[n] else "-" for n in names]]
    return rows


def _contention(result):
    if "cpu_s" not in result:
        return "-"
    return f"{result['cpu_s'] / result['wall_s']:.2f}, {result['loadavg_1min']:.1f}"


def render(header, rows, markdown):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def say(msg):
    print(msg, flush=True)


def measure_bandwidth(args) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); import model_workers; "
            "print(json.dumps(model_workers.bandwidth(threads=%d)))") % (str(Path(__file__).resolve().parent), args.torch_threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_tables(report, markdown, clock="wall"):
    a, bw = report["args"], report["bandwidth"]
    for quant, results in report["variants"].items():
        title = f"{a['shape']}, {'unquantized' if quant == 'none' else quant + '-bit'}"
        parts = [f"repeats={a['repeats']}", f"warmup={a['warmup']}"]
        if "prefill" in a["only"]:
            parts.append(f"prefill {a['prefill_tokens']} text tokens")
        if "decode" in a["only"]:
            parts.append(f"decode {a['decode_tokens']} tokens")
        parts.append(f"{clock} clock; speedup >1 = plugin faster (medians)")
        note = ", ".join(parts)
        say(f"\n== {title} ({note})")
        say(variant_table(results, bw, clock=clock))
        if markdown:
            say(f"\n**{title}** ({note})\n")
            say(variant_table(results, bw, markdown=True, clock=clock))


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.from_json is not None:
        return print_tables(json.loads(args.from_json.read_text()), args.markdown, args.clock)
    started = time.perf_counter()
    say(f"bench_model: shape={args.shape} quant={','.join(args.quant)} repeats={args.repeats} "
        f"warmup={args.warmup} decode_tokens={args.decode_tokens} prefill_tokens={args.prefill_tokens} "
        f"vision={','.join(args.vision_sizes)} only={','.join(args.only)} backends={','.join(args.backends)}")
    say(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")

    base = bf16_checkpoint(args)
    params = _param_count(base)
    variants = {q: (base if q == "none" else quantized_checkpoint(base, q)) for q in args.quant}
    estimate = sum(estimate_seconds(args, params, q) * sum(1 for b in args.backends if not (b == "transformers" and q != "none"))
                   for q in variants)
    say(f"checkpoint: {base} ({params / 1e9:.3g} B parameters)")
    say(f"expected duration: roughly {estimate / 60:.0f} min (from the built-in's 2B CPU speed, scaled; "
        f"cut it with --repeats, --decode-tokens, --prefill-tokens, --vision-sizes, --only)")

    bw = measure_bandwidth(args)
    say("memory bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw["per_method"].items())
        + "; share of the arrays in huge pages: "
        + ", ".join(f"{k} {v:.0%}" for k, v in bw.get("huge_page_share", {}).items()))

    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "checkpoint": str(base), "parameters": params, "bandwidth": bw, "variants": {}}
    for quant, path in variants.items():
        results = {}
        for backend in args.backends:
            say(f"--- {backend}, quant={quant}: {path}")
            t0 = time.perf_counter()
            results[backend] = run_worker(args, backend, path, quant)
            status = results[backend].get("unavailable") or f"done in {time.perf_counter() - t0:.0f} s"
            say(f"    {status}")
        report["variants"][quant] = results

    print_tables(report, args.markdown, args.clock)
    report["wall_s"] = time.perf_counter() - started
    say(f"\ntotal wall time {report['wall_s'] / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        say(f"wrote {args.json}")


def _param_count(path: Path) -> int:
    import json as _json
    import struct

    total = 0
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = _json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


if __name__ == "__main__":
    main()
