#!/usr/bin/env bash
# The GPU suite: the one command to run on the lent GPU machine, from the repository root.
#
#   bash benchmarks/gpu_suite.sh                    # setup, then the default stages: bench kernels (~10 min)
#   bash benchmarks/gpu_suite.sh tests compile      # setup, then only these stages (any of the seven below)
#
# Through the device tool: run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600),
# after `bash benchmarks/gpu_wheels.sh` here has filled .whl/. Everything printed goes to
# $OUT/suite.log and the result files this run writes under benchmarks/results/ are copied to
# $OUT/results/, so the tool brings them back (without $OUT: runs/gpu-suite/suite.log).
#
# setup (always): installs the carried wheels into $SITE (default /tmp/site) with pip --target, offline;
#   the machine's image lacks deepspeed, datasets, pydantic, hjson... (see gpu_wheels.sh). A carried
#   wheel of a package the image already has is a fallback, installed only when the image's version
#   does not satisfy what the other carried wheels require.
#   megatrain is not installed there: PYTHONPATH=$SITE, and a generated $SITE/sitecustomize.py maps
#   `megatrain` to <repo>/megatrain and `megatrain.kernels` to <repo>/kernels (setuptools' package-dir
#   mapping, which only an install provides otherwise). The repository root is never put on the path:
#   its kernels/ folder would shadow Hugging Face's `kernels` package, which transformers imports. A copy
#   made by `pip install --target $SITE .` would not do: `python -m` and `python -c` from the root put
#   the repository's own megatrain/ (which has no kernels/) ahead of it. And a .pth file would not do
#   either: Python reads .pth files in site directories only, never in PYTHONPATH entries.
# tests: python -m pytest -q tests/kernels with MEGATRAIN_KERNELS=triton (the same tests, on CUDA), except
#   test_compile_cuda.py, which the compile stage replaces.
# compile: python benchmarks/compile_report.py with every core and no cache: the image's Triton compiles
#   every launch config for sm_80 and sm_90 and writes benchmarks/results/kernels-compiled-gpu-image.md.
# bench (default): `megatrain bench` of the trainer against HF Llama + DeepSpeed and the plain PyTorch loop
#   (all three sides, bf16, seq 2048, global batch 8) at 125m (micro-batch 8, ZeRO-1 and ZeRO-2, 20 steps)
#   and 1.3b (micro-batch 4, ZeRO-1, 10 steps), tagged bench-125m-<gpu>-bf16 and bench-1.3b-<gpu>-bf16.
# kernels (default): python benchmarks/kernels.py $KERNELS_ARGS (default --quick: one shape per op).
# throughput: python benchmarks/throughput.py $THROUGHPUT_ARGS (default: the 125m preset, seq 2048,
#   micro-batch 8, 20 steps).
# zero: python benchmarks/zero_step.py (the 125m preset's 111 tensors, ZeRO 1/2, bf16/fp32): DeepSpeed's
#   stock optimizer step against megatrain's lean one, ATen ops, CUDA kernels, host and wall ms (~1 min).
#
# A failing stage does not stop the later ones; the script exits non-zero at the end if any failed.
# One device-tool call may run 10 minutes: if the whole suite does not fit, split the stages over
# two calls (a warm machine keeps $SITE, and setup is quick to repeat anyway).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-$REPO/.whl}
LOG_DIR=${OUT:-$REPO/runs/gpu-suite}
KERNELS_ARGS=${KERNELS_ARGS---quick}
THROUGHPUT_ARGS=${THROUGHPUT_ARGS:---preset 125m --seq-len 2048 --micro-batch 8 --steps 20}
ALL_STAGES=(tests compile bench kernels throughput zero)
DEFAULT_STAGES=(bench kernels)
export PYTHONUNBUFFERED=1

stages=("$@")
if (( ${#stages[@]} == 0 )); then
    stages=("${DEFAULT_STAGES[@]}")
fi
for stage in "${stages[@]}"; do
    case "$stage" in
        setup|tests|compile|bench|kernels|throughput|zero) ;;
        *) echo "gpu_suite.sh: unknown stage '$stage' (stages: setup ${ALL_STAGES[*]})" >&2; exit 2 ;;
    esac
done

# Reads carried wheels' metadata with the image's own python3 and packaging.
#   select WHEEL_DIR: prints the wheels to install, and why each is or is not, on stderr
#   check SITE:       warns about requirements of the installed wheels that nothing satisfies
wheel_helper() {
    "$PYTHON" - "$@" <<'PY'
import importlib.metadata as metadata
import pathlib
import sys
import zipfile
from email.parser import HeaderParser

mode, where = sys.argv[1], pathlib.Path(sys.argv[2])
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # without packaging no version can be compared: carry everything over
    if mode == "select":
        print("  packaging is not importable: installing every carried wheel", file=sys.stderr)
        print("\n".join(str(w) for w in sorted(where.glob("*.whl"))))
    sys.exit(0)


def needed(requirements):
    """Requirement objects that apply here (no extras, markers for this interpreter)."""
    for text in requirements or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            yield req


def installed_version(name):
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


if mode == "select":
    carried = {}
    for wheel in sorted(where.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            meta_path = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            meta = HeaderParser().parsestr(archive.read(meta_path).decode("utf-8"))
        carried[canonicalize_name(meta["Name"])] = (wheel, meta["Version"], list(needed(meta.get_all("Requires-Dist"))))
    wanted = {}
    for requirer, (_, _, reqs) in carried.items():
        for req in reqs:
            wanted.setdefault(canonicalize_name(req.name), []).append((requirer, req.specifier))
    for name, (wheel, version, _) in carried.items():
        have = installed_version(name)
        unmet = [f"{requirer} needs {spec}" for requirer, spec in wanted.get(name, [])
                 if not spec.contains(have, prereleases=True)] if have is not None else []
        if have is None:
            print(f"  install {name} {version}: not in the image", file=sys.stderr)
        elif unmet:
            print(f"  install {name} {version}: the image has {have}, but {'; '.join(unmet)}", file=sys.stderr)
        else:
            print(f"  skip    {name} {version}: the image's {have} satisfies every carried wheel", file=sys.stderr)
            continue
        print(wheel)
else:
    problems = 0
    for dist in metadata.distributions(path=[str(where)]):
        for req in needed(dist.requires):
            have = installed_version(req.name)
            if have is None or not req.specifier.contains(have, prereleases=True):
                problems += 1
                print(f"  warning: {dist.metadata['Name']} needs {req}, found {have or 'nothing'}")
    print("  requirements of the carried wheels: " + ("all met" if not problems else f"{problems} unmet (above)"))
PY
}

# Writes $SITE/sitecustomize.py, which maps megatrain and megatrain.kernels to the repository's folders.
write_kernels_shim() {
    "$PYTHON" - "$SITE" "$REPO" <<'PY'
import pathlib
import sys

site, repo = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
shim = f'''"""Generated by benchmarks/gpu_suite.sh: `megatrain` is {repo}/megatrain, `megatrain.kernels` {repo}/kernels.

pyproject.toml installs kernels/ as megatrain.kernels (package-dir); this machine runs the checkout
uninstalled, so this finder gives the same mapping. It comes after the normal path finder, so an
installed megatrain still wins.
"""
import importlib.machinery
import importlib.util
import os
import sys

_FOLDERS = {{"megatrain": {str(repo / "megatrain")!r}, "megatrain.kernels": {str(repo / "kernels")!r}}}


class _MegatrainKernelsFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder = _FOLDERS.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


sys.meta_path.append(_MegatrainKernelsFinder)


def _run_shadowed_sitecustomize():
    # This file hides any sitecustomize later on sys.path (the image's own, if it has one): run it too.
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_run_shadowed_sitecustomize()
'''
site.mkdir(parents=True, exist_ok=True)
(site / "sitecustomize.py").write_text(shim)
PY
}

setup() {
    echo "=== setup: $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $REPO"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    else
        echo "(no nvidia-smi on this machine)"
    fi
    "$PYTHON" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} (CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}), triton {triton.__version__}")'

    mkdir -p "$SITE"
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "carried wheels in $WHEELS:"
        local selection selected=()
        selection=$(wheel_helper select "$WHEELS")  # an assignment, so that set -e sees a failure
        [[ -z "$selection" ]] || mapfile -t selected <<< "$selection"
        if (( ${#selected[@]} )); then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "${selected[@]}"
        fi
    else
        echo "warning: no wheels in $WHEELS: carry .whl (made here by benchmarks/gpu_wheels.sh);" \
             "without them deepspeed and datasets are missing and the throughput stage fails"
    fi
    write_kernels_shim
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    wheel_helper check "$SITE"
    # Everything after this relies on the mapping: stop here if it does not work.
    "$PYTHON" -c 'import megatrain.kernels, megatrain.models.transformer as t; print("megatrain.kernels ->", megatrain.kernels.__file__); print("megatrain.models.transformer ->", t.__file__)'
}

failed=()
run_stage() {
    local name=$1 start=$SECONDS status=0
    shift
    echo
    echo "=== $name: $*"
    "$@" || status=$?
    if (( status == 0 )); then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        echo "=== $name: FAILED with exit status $status ($((SECONDS - start)) s)"
        failed+=("$name")
    fi
    collect_results
}

# The results this run wrote (newer than the stamp) go to $OUT/results/ for the device tool.
stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
collect_results() {
    [[ -n "${OUT:-}" ]] || return 0
    mkdir -p "$OUT/results"
    find benchmarks/results -maxdepth 1 -type f -newer "$stamp" -exec cp {} "$OUT/results/" \;
}

# The trainer against both peers: megatrain bench at two sizes, every side, one stage each.
bench_trainer() {
    local gpu
    gpu=$("$PYTHON" -c 'import torch, re; print(re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-").replace("nvidia-", ""))')
    run_stage bench-125m "$PYTHON" -m megatrain.cli bench launch/configs/125m.yaml train.global_batch=8 \
        --settings mb=8,zero=1 mb=8,zero=2 --steps 20 --block 5 --warmup 3 --breakdown-steps 1 \
        --out benchmarks/results --tag "bench-125m-$gpu-bf16"
    run_stage bench-1.3b "$PYTHON" -m megatrain.cli bench launch/configs/1.3b.yaml train.global_batch=8 \
        train.activation_checkpointing=false --settings mb=4,zero=1 --steps 10 --block 5 --warmup 2 \
        --breakdown-steps 1 --out benchmarks/results --tag "bench-1.3b-$gpu-bf16"
}

main() {
    setup
    for stage in "${stages[@]}"; do
        case "$stage" in
            setup) ;;
            tests) run_stage tests env MEGATRAIN_KERNELS=triton MEGATRAIN_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider -rf tests/kernels --ignore=tests/kernels/test_compile_cuda.py ;;
            bench) bench_trainer ;;
            compile) run_stage compile "$PYTHON" benchmarks/compile_report.py --jobs "$(nproc)" --cache none --write benchmarks/results/kernels-compiled-gpu-image.md ;;
            # shellcheck disable=SC2086  # the argument strings are meant to split into arguments
            kernels) run_stage kernels "$PYTHON" benchmarks/kernels.py $KERNELS_ARGS ;;
            # shellcheck disable=SC2086
            throughput) run_stage throughput "$PYTHON" benchmarks/throughput.py $THROUGHPUT_ARGS ;;
            zero) run_stage zero "$PYTHON" benchmarks/zero_step.py ;;
        esac
    done
    echo
    if (( ${#failed[@]} )); then
        echo "=== GPU suite: FAILED stages: ${failed[*]}"
        return 1
    fi
    echo "=== GPU suite: all stages passed (${stages[*]})"
}

mkdir -p "$LOG_DIR"
main 2>&1 | tee -a "$LOG_DIR/suite.log"
