"""Batched greedy decoding through mlx-vlm's BatchGenerator: tokens/s at batch 1, 2, 4, 8, this
plugin vs mlx-vlm's built-in qwen3_vl, same seeded random-weight checkpoint.

    python benchmarks/bench_batch.py                          # 2B bfloat16, 16 tokens a row
    python benchmarks/bench_batch.py --shape tiny --batch-sizes 1,2,4,8,16 --tokens 64

The rows are fed as the server feeds them: each prompt embedded alone (text only, ordinary tokens,
lengths differing by up to 3 so the merged prefill is left-padded), then inserted together with
`prefill_batch_size = completion_batch_size = batch`. No row stops early: no EOS, `--tokens` each.
Each backend runs in its own subprocess, one after the other. The checkpoint is the one
bench_model.py builds and caches (`~/.cache/mlx-vlm-qwen3vl/bench/<shape>-<dtype>-seed<seed>`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import CACHE_ROOT, DISABLE_ENV, _last_error, bf16_checkpoint, render, say  # noqa: E402
from model_workers import prompt_ids  # noqa: E402

BACKENDS = ("plugin", "builtin")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2b", help="builder shape: tiny, 2b, 4b, 8b, 32b")
    p.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per row (CPU: keep it small)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="longest prompt of a batch")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--checkpoint", type=Path, default=None, help="use this checkpoint instead of building one")
    p.add_argument("--cache-dir", type=Path, default=CACHE_ROOT)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--from-json", type=Path, default=None,
                   help="print the tables of an earlier --json file instead of measuring")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    args.backends = [s.strip() for s in args.backends.split(",") if s.strip()]
    if any(b < 1 for b in args.batch_sizes) or args.tokens < 2 or args.prompt_tokens < 4:
        p.error("batch sizes must be >= 1, --tokens >= 2 and --prompt-tokens >= 4")
    if set(args.backends) - set(BACKENDS):
        p.error(f"--backends: choose from {', '.join(BACKENDS)}")
    return args


# ------------------------------------------------------------------ worker
def _quiet_processor():
    """The generator's processor: a stopping criteria without EOS tokens."""
    from types import SimpleNamespace

    from mlx_vlm.utils import StoppingCriteria

    return SimpleNamespace(tokenizer=SimpleNamespace(stopping_criteria=StoppingCriteria([], None)))


def _embedded_rows(model, batch, prompt_tokens, seed):
    import mlx.core as mx

    ids, kwargs = [], []
    for row in range(batch):
        row_ids = mx.array(prompt_ids(prompt_tokens - row % 4, seed + row))
        features = model.get_input_embeddings(row_ids, None, mask=mx.ones(row_ids.shape, mx.int32))
        values = {k: v for k, v in features.to_dict().items() if v is not None}
        mx.eval(list(values.values()))
        ids.append(row_ids[0].tolist())
        kwargs.append(values)
    return ids, kwargs


def generate_batch(model, batch, tokens, prompt_tokens, seed):
    """One BatchGenerator run; seconds (wall and CPU) to the first tokens and to the end."""
    from mlx_vlm.generate.ar import BatchGenerator

    ids, kwargs = _embedded_rows(model, batch, prompt_tokens, seed)
    generator = BatchGenerator(model.language_model, _quiet_processor(), prefill_batch_size=batch,
                               completion_batch_size=batch, compute_logprobs=False)
    wall, cpu = time.perf_counter(), time.process_time()
    uids = generator.insert(ids, tokens, prompt_kwargs=kwargs)
    got, first = {uid: [] for uid in uids}, None
    while generator.has_work:
        for response in generator.next()[1]:
            got[response.uid].append(response.token)
        if first is None and any(got.values()):
            first = (time.perf_counter() - wall, time.process_time() - cpu)
    end = (time.perf_counter() - wall, time.process_time() - cpu)
    generator.close()
    rows = [got[uid] for uid in uids]
    if any(len(row) != tokens for row in rows):
        raise RuntimeError(f"rows generated {[len(r) for r in rows]} tokens, expected {tokens} each")
    return {"batch": batch, "prompt_tokens": sum(len(r) for r in ids), "first": first, "end": end,
            "tokens": rows}


def worker_main(spec_json):
    import mlx.core as mx

    from mlx_vlm import load

    spec = json.loads(spec_json)
    model, _ = load(spec["path"])
    print(f"loaded {type(model).__module__}", file=sys.stderr, flush=True)
    generate_batch(model, 1, 2, 4, spec["seed"])  # warm-up
    runs = []
    for batch in spec["batch_sizes"]:
        run = generate_batch(model, batch, spec["tokens"], spec["prompt_tokens"], spec["seed"])
        print(f"batch {batch}: {run['end'][0]:.1f} s", file=sys.stderr, flush=True)
        runs.append(run)
    result = {"backend": spec["backend"], "model_class": type(model).__module__, "runs": runs,
              "peak_memory_gb": mx.get_peak_memory() / 1e9, "loadavg_1min": os.getloadavg()[0]}
    Path(spec["result_file"]).write_text(json.dumps(result))


def run_worker(args, backend, path) -> dict:
    spec = {"backend": backend, "path": str(path), "batch_sizes": args.batch_sizes, "tokens": args.tokens,
            "prompt_tokens": args.prompt_tokens, "seed": args.seed}
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    if backend == "builtin":
        env[DISABLE_ENV] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        spec["result_file"] = str(Path(tmp) / "result.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr.splitlines():
            if line.strip() and "Loading weights" not in line:
                say(f"    | {line}")
        if proc.returncode or not Path(spec["result_file"]).is_file():
            return {"backend": backend, "unavailable": _last_error(proc.stderr)}
        return json.loads(Path(spec["result_file"]).read_text())


# ------------------------------------------------------------------ report
def rates(run, clock):
    """Decode tokens/s (after the first tokens) and end-to-end tokens/s (prefill included)."""
    i = 0 if clock == "wall" else 1
    batch, tokens = run["batch"], len(run["tokens"][0])
    decode = batch * (tokens - 1) / (run["end"][i] - run["first"][i])
    return decode, batch * tokens / run["end"][i]


def table(results, clock, markdown):
    names = [r["backend"] for r in results if "runs" in r]
    by_batch = {}
    for result in results:
        for run in result.get("runs", []):
            by_batch.setdefault(run["batch"], {})[result["backend"]] = rates(run, clock)
    header = ["batch"] + [f"{n} decode tok/s" for n in names] + [f"{n} end-to-end tok/s" for n in names]
    header += [f"{n} x batch 1" for n in names]
    if len(names) == 2:
        header.append(f"{names[0]}/{names[1]} decode")
    base = by_batch.get(min(by_batch), {}) if by_batch else {}
    rows = []
    for batch, cells in sorted(by_batch.items()):
        row = [str(batch)] + [f"{cells[n][0]:.2f}" for n in names] + [f"{cells[n][1]:.2f}" for n in names]
        row += [f"{cells[n][0] / base[n][0]:.2f}" if n in base else "-" for n in names]
        if len(names) == 2:
            row.append(f"{cells[names[0]][0] / cells[names[1]][0]:.2f}")
        rows.append(row)
    return render(header, rows, markdown)


def agreement(results):
    """Rows whose greedy tokens are identical in both backends (information only: bfloat16
    rounding differs between implementations)."""
    runs = [{run["batch"]: run["tokens"] for run in r["runs"]} for r in results if "runs" in r]
    if len(runs) != 2:
        return None
    same = total = 0
    for batch, rows in runs[0].items():
        for a, b in zip(rows, runs[1].get(batch, [])):
            same, total = same + (a == b), total + 1
    return same, total


def report(results, args):
    for r in results:
        if "unavailable" in r:
            say(f"{r['backend']}: unavailable: {r['unavailable']}")
    for clock in ("wall", "cpu"):
        say(f"\n{args.shape} {args.dtype}, {args.tokens} greedy tokens a row, {clock} clock; decode "
            "excludes the prefill step, end-to-end includes it; ratio > 1 = plugin faster")
        say(table(results, clock, args.markdown))
    same = agreement(results)
    if same:
        say(f"rows with identical tokens in both backends: {same[0]}/{same[1]}")
    # MLX on a CPU runs one thread: CPU/wall well below 1 means other processes took the cores,
    # and then the cpu-clock table is the fair comparison.
    for r in results:
        if "runs" in r:
            wall = sum(run["end"][0] for run in r["runs"])
            cpu = sum(run["end"][1] for run in r["runs"])
            say(f"{r['backend']}: CPU/wall {cpu / wall:.2f}, load average {r['loadavg_1min']:.1f}, "
                f"peak MLX memory {r['peak_memory_gb']:.1f} GB")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        args.shape, args.dtype, args.tokens = (saved["args"][k] for k in ("shape", "dtype", "tokens"))
        return report(saved["results"], args)
    path = bf16_checkpoint(args)
    say(f"checkpoint {path}; batches {args.batch_sizes}, {args.tokens} tokens a row, "
        f"prompts up to {args.prompt_tokens} tokens")
    results = []
    for backend in args.backends:
        say(f"-- {backend}")
        start = time.perf_counter()
        results.append(run_worker(args, backend, path))
        say(f"   {time.perf_counter() - start:.0f} s")
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
