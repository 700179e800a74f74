"""Compile every CUDA launch configuration of megatrain's Triton kernels for sm_80 and sm_90, no GPU needed.

For the model presets 125m..7b (their hidden sizes, heads and head dims, the default low-rank ranks
d/4 and d/8, GaLore's ranks, the vocabulary whole and split over 8 tensor-parallel ranks) and the
dtypes bf16, fp16 and fp32, each kernel module lists the launches its
CUDA launchers would make (`cuda_launches`, built from the same config functions the launchers call;
every candidate of an autotuned kernel). Equal launches are compiled once. Each is compiled with
`triton.compile` for both targets, and the shared memory per program, registers and spill stack
are checked: shared memory within the target's per-block limit, no spills in memory-bound kernels.

    python benchmarks/compile_report.py                     # compile, print the table, exit 1 on a violation
    python benchmarks/compile_report.py --write docs/kernels-compiled.md
    python benchmarks/compile_report.py --json out.json     # machine-readable results (the test reads them)

TRITON_INTERPRET is removed from this process's environment before the kernels are imported (the
interpreter's functions cannot be compiled). Triton's own cache (~/.triton/cache, or
TRITON_CACHE_DIR) keeps compiled kernels, so a second run only re-reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is every version's default

import torch  # noqa: E402
import triton  # noqa: E402

from megatrain.kernels import activation, aot, cross_entropy, iha, lowrank, norm, projected_adam, rotary  # noqa: E402
from megatrain.kernels import sparse_lowrank  # noqa: E402
from megatrain.models.config import PRESETS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "kernels-compiled.md"
CACHE = REPO / "docs" / "kernels-compiled.json"
MODEL_PRESETS = ("125m", "350m", "760m", "1.3b", "7b")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VOCAB = 32000  # the launch configs' vocabulary (launch/configs/*.yaml)
TENSOR_PARALLEL = 8  # launch/configs/7b-tp8.yaml: heads and vocabulary split 8 ways
GALORE_RANKS = (128, 256, 512, 1024)  # optim.rank default and the GaLore paper's ranks up to 7B


def problem_launches() -> list[aot.KernelLaunch]:
    """Every CUDA launch the presets' problems make, in a fixed order, with duplicates merged (their
    notes joined)."""
    found: dict[tuple, aot.KernelLaunch] = {}
    notes: dict[tuple, list[str]] = {}

    def add(launches, where: str):
        for launch in launches:
            key = launch.key()
            found.setdefault(key, launch)
            label = f"{where} {launch.note}".strip()
            if label not in notes.setdefault(key, []):
                notes[key].append(label)

    for dtype in DTYPES:
        add(activation.cuda_launches(dtype), "all")
        add(sparse_lowrank.cuda_launches(dtype), "sltrain")
        for vocab in (VOCAB, VOCAB // TENSOR_PARALLEL):
            add(cross_entropy.cuda_launches(vocab, dtype), "all")
        for preset in MODEL_PRESETS:
            p = PRESETS[preset]
            dim, heads, kv_heads = p["dim"], p["heads"], p["kv_heads"]
            head_dim = dim // heads
            add(norm.cuda_launches(dim, dtype), preset)
            add(rotary.cuda_launches(head_dim, heads, kv_heads, dtype), preset)
            add(
                rotary.cuda_launches(head_dim, heads // TENSOR_PARALLEL or 1, kv_heads // TENSOR_PARALLEL or 1, dtype),
                f"{preset}/tp{TENSOR_PARALLEL}",
            )
            for rank in sorted({dim // 4, dim // 8}):
                add(lowrank.cuda_launches(rank, dtype), preset)
            add(iha.cuda_launches(head_dim, dtype), preset)  # P is a runtime value of the IHA kernels
    for rank in GALORE_RANKS:
        add(projected_adam.cuda_launches(rank), "galore/fira")
    return [
        aot.KernelLaunch(launch.kernel, launch.arg_types, launch.config, launch.memory_bound, "; ".join(notes[key]))
        for key, launch in found.items()
    ]


def violations(launch: aot.KernelLaunch, capability: int, result: aot.CompileResult) -> list[str]:
    """What is wrong with a compiled launch: shared memory over the target's limit, spills in a
    memory-bound kernel. Empty when it is fine."""
    out = []
    limit = aot.SHARED_MEMORY_LIMIT[capability]
    if result.shared > limit:
        out.append(f"sm_{capability}: shared memory {result.shared // 1024} KB > {limit // 1024} KB")
    if launch.memory_bound and result.spill_stores > 0:
        out.append(
            f"sm_{capability}: memory-bound kernel spills ({result.spill_stores} spill stores, {result.stack} B stack)"
        )
    return out


def cache_key(launch: aot.KernelLaunch, capability: int) -> str:
    """Identifies a compilation: the kernel's Triton cache key (a hash of its source and of every
    @triton.jit function it calls), its signature, its config and the target."""
    types = ",".join(t for _, t in launch.arg_types)
    return f"{launch.name}|{launch.kernel.cache_key}|{types}|{launch.config.describe()}|sm_{capability}"


_LAUNCHES: list[aot.KernelLaunch] = []


def _compile_one(job: tuple[int, int]) -> tuple[int, int, dict]:
    index, capability = job
    try:
        result = aot.compile_launch(_LAUNCHES[index], capability)
        return (
            index,
            capability,
            {
                "shared": result.shared,
                "registers": result.registers,
                "stack": result.stack,
                "spill_stores": result.spill_stores,
            },
        )
    except Exception as exc:  # a launch that does not compile is a result to report, not a crash
        return index, capability, {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}


def compile_all(launches: list[aot.KernelLaunch], jobs: int, cached: dict, spot_check: bool):
    """Compile what `cached` ({cache_key: result}, from the same Triton version) does not hold.

    With spot_check, the cached launch of each kernel with the most shared memory on sm_90 is
    compiled again, to show the cache still describes what Triton produces. Returns
    ({(launch index, capability): {"shared", "registers", "stack"} or {"error"}}, compiled keys,
    [spot-check mismatches]).
    """
    global _LAUNCHES
    _LAUNCHES = launches
    results, work = {}, []
    for i, launch in enumerate(launches):
        for cap in aot.TARGETS:
            key = cache_key(launch, cap)
            if "spill_stores" in cached.get(key, {}) or "error" in cached.get(key, {}):
                results[(i, cap)] = cached[key]
            else:
                work.append((i, cap))
    spots = []
    if spot_check:
        best: dict[str, tuple[int, int]] = {}
        for (i, cap), res in results.items():
            if cap == aot.TARGETS[-1] and "shared" in res:
                name = launches[i].name
                if name not in best or res["shared"] > best[name][1]:
                    best[name] = (i, res["shared"])
        spots = [(i, aot.TARGETS[-1]) for i, _ in best.values()]
    todo = work + spots
    if jobs <= 1 or len(todo) <= 1:
        fresh = list(map(_compile_one, todo))
    else:
        # fork: the children inherit the imported kernels (the @triton.jit objects do not pickle).
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
            fresh = list(pool.map(_compile_one, todo, chunksize=2))
    mismatches = []
    compiled = []
    for (i, cap, res), job in zip(fresh, todo):
        if job in spots and job not in work:
            if res != results[(i, cap)]:
                mismatches.append(f"{cache_key(launches[i], cap)}: cached {results[(i, cap)]}, compiled {res}")
            continue
        results[(i, cap)] = res
        compiled.append(cache_key(launches[i], cap))
    return results, compiled, mismatches


def sample(launches: list[aot.KernelLaunch], per_kernel: int, recorded: dict) -> list[aot.KernelLaunch]:
    """The `per_kernel` launches of each kernel with the most shared memory on sm_90 in `recorded`
    ({cache_key: result}, from any Triton version; unrecorded launches count as 0)."""

    def shared(launch):
        return recorded.get(cache_key(launch, aot.TARGETS[-1]), {}).get("shared", 0)

    by_kernel: dict[str, list[aot.KernelLaunch]] = {}
    for launch in launches:
        by_kernel.setdefault(launch.name, []).append(launch)
    picked = {id(x) for group in by_kernel.values() for x in sorted(group, key=shared, reverse=True)[:per_kernel]}
    return [launch for launch in launches if id(launch) in picked]


def load_cache(path: Path) -> dict:
    """{cache_key: result} from a report JSON written by the same Triton version, else {}."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data.get("results", {}) if data.get("triton") == triton.__version__ else {}


def report_rows(launches, results) -> list[dict]:
    rows = []
    for i, launch in enumerate(launches):
        types = dict(launch.arg_types)
        first_ptr = next(t for _, t in launch.arg_types if t.startswith("*"))
        row = {
            "kernel": launch.name,
            "dtype": first_ptr[1:],
            "config": launch.config.describe(),
            "memory_bound": launch.memory_bound,
            "used_by": launch.note,
            "problems": [],
            "signature": ",".join(types.values()),
        }
        for cap in aot.TARGETS:
            res = results[(i, cap)]
            row[f"sm_{cap}"] = res
            if "error" in res:
                row["problems"].append(f"sm_{cap}: does not compile: {res['error']}")
            else:
                row["problems"] += violations(launch, cap, aot.CompileResult(**res))
        rows.append(row)
    return rows


def _cell(res: dict) -> str:
    if "error" in res:
        return "error"
    return f"{res['shared'] / 1024:.0f} KB / {res['registers']} / {res['spill_stores']}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Triton kernels compiled for sm_80 and sm_90",
        "",
        "Generated by `python benchmarks/compile_report.py --write docs/kernels-compiled.md` (no GPU needed);",
        "`tests/kernels/test_compile_cuda.py` checks that it is current. Do not edit by hand.",
        "",
        f"Triton {triton.__version__}. Every CUDA launch the launchers can choose for the presets "
        f"{', '.join(MODEL_PRESETS)} in bf16, fp16 and fp32 (every candidate of the autotuned kernels), compiled "
        "with `triton.compile` for sm_80 (A100) and sm_90 (H100); kernels with optional work (residual, bias, "
        "activation, window...) are compiled with it on.",
        "",
        "Each cell: shared memory per program / registers per thread / spill stores (local-memory stores in the "
        "SASS; the JSON beside this file also has the stack frame in bytes). Limits: "
        f"{aot.SHARED_MEMORY_LIMIT[80] // 1024} KB on sm_80, {aot.SHARED_MEMORY_LIMIT[90] // 1024} KB on sm_90; "
        "memory-bound kernels (mem) must not spill. Spills in the matmul-shaped kernels are reported, not refused.",
        "",
        "| kernel | dtype | config | kind | sm_80 | sm_90 | used by |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kind = "mem" if row["memory_bound"] else "matmul"
        lines.append(
            f"| `{row['kernel']}` | {row['dtype']} | {row['config']} | {kind} | {_cell(row['sm_80'])} | "
            f"{_cell(row['sm_90'])} | {row['used_by']} |"
        )
    problems = [f"- `{row['kernel']}` {row['dtype']} {row['config']}: {p}" for row in rows for p in row["problems"]]
    lines += ["", f"{len(rows)} launches, {len(rows) * len(aot.TARGETS)} compilations.", ""]
    lines += ["Problems:", ""] + (problems or ["none"]) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument(
        "--cache",
        type=Path,
        default=CACHE,
        help=f"results of earlier compilations with this Triton version (default {CACHE.relative_to(REPO)}; "
        "--write updates it); 'none' compiles everything",
    )
    parser.add_argument(
        "--spot-check",
        action="store_true",
        help="recompile each kernel's largest cached launch and report any difference",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="K",
        help="compile only the K launches of each kernel with the most shared memory on sm_90 in the "
        "committed results (make compat: another Triton version, a few minutes instead of many)",
    )
    args = parser.parse_args(argv)
    start = time.time()
    launches = problem_launches()
    if args.sample:
        recorded = json.loads(CACHE.read_text()).get("results", {}) if CACHE.exists() else {}
        launches = sample(launches, args.sample, recorded)
    cached = {} if str(args.cache) == "none" else load_cache(args.cache)
    results, compiled, mismatches = compile_all(launches, args.jobs, cached, args.spot_check)
    rows = report_rows(launches, results)
    text = markdown(rows)
    table = {cache_key(launch, cap): results[(i, cap)] for i, launch in enumerate(launches) for cap in aot.TARGETS}
    if args.write:
        if args.sample:
            parser.error("--write needs every launch: drop --sample")
        args.write.write_text(text)
        if str(args.cache) != "none":
            args.cache.write_text(
                json.dumps({"triton": triton.__version__, "results": table}, indent=0, sort_keys=True) + "\n"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "triton": triton.__version__,
                    "sample": args.sample,
                    "markdown": text,
                    "rows": rows,
                    "compiled": compiled,
                    "spot_check_mismatches": mismatches,
                    "cache_hits": len(table) - len(compiled),
                },
                indent=1,
            )
        )
    bad = [row for row in rows if row["problems"]]
    print(
        f"{len(rows)} launches for sm_80 and sm_90 with triton {triton.__version__}: {len(compiled)} compiled, "
        f"{len(table) - len(compiled)} from the cache, in {time.time() - start:.0f} s; {len(bad)} with problems"
    )
    for mismatch in mismatches:
        print(f"  cache differs from a fresh compile: {mismatch}")
    for row in bad:
        for problem in row["problems"]:
            print(f"  {row['kernel']} {row['dtype']} {row['config']}: {problem}")
    return 1 if bad or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
