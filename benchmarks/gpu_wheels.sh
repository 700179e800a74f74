#!/usr/bin/env bash
# Fill .whl/ (repository root) with the wheels the lent GPU machine lacks for megatrain's GPU suite
# and trainer. Run it HERE, where PyPI is reachable; the GPU machine reaches nothing, so the wheels
# travel with the working tree (name `.whl` in the device tool's `carry`) and
# benchmarks/gpu_suite.sh installs them there.
#
#   bash benchmarks/gpu_wheels.sh
#
# Target: the GPU image's python3, CPython 3.12 on manylinux x86_64. What that image already holds is
# listed in /work/.library/device/KINDS.md ("Python packages already there", read 2026-11-17):
# torch, triton, numpy, pyarrow, pandas, fsspec, huggingface-hub, xxhash, requests, tqdm, pyyaml,
# safetensors, sentencepiece, tensorboard, einops, msgpack, ninja, psutil, py-cpuinfo, packaging,
# nvidia-ml-py, pytest, pytest-timeout... are there, so only the rest is fetched. Versions are the ones
# this repository's .venv runs its tests with.
#
# The wheels replace .whl/ as a whole (fetched into a temporary folder first, so a failed run leaves
# the previous set), one version of each package: two versions of one package stop the install there.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Not in the image at all.
MISSING=(
    # deepspeed's own needs that the image lacks: hjson and pydantic with its three companions
    hjson==3.1.0
    pydantic==2.14.3
    pydantic-core==2.50.4      # the only compiled one: cp312 manylinux
    annotated-types==0.8.0
    typing-inspection==0.4.5
    # megatrain.data reads files through datasets; dill and multiprocess are its needs the image lacks
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    # optional: the benchmark compares against Liger-Kernel's ops when it imports (needs only torch, triton)
    liger-kernel==0.8.5
)
# In the image, but possibly older (or, for fsspec, newer) than the wheels above require:
# gpu_suite.sh installs each of these only when the image's own version does not satisfy them.
FALLBACKS=(
    typing-extensions==4.16.0  # pydantic 2.14 and pydantic-core 2.50 need >= 4.16.0
    fsspec==2026.9.0           # datasets 5.2.0 needs <= 2026.9.0
)
DEEPSPEED=deepspeed==0.19.8    # published as a source archive only: built here into a pure-Python wheel

PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done

staging=$(mktemp -d "${TMPDIR:-/tmp}/megatrain-wheels.XXXXXX")
trap 'rm -rf "$staging"' EXIT

echo "downloading ${#MISSING[@]} + ${#FALLBACKS[@]} wheels for CPython 3.12 manylinux x86_64"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$staging" "${MISSING[@]}" "${FALLBACKS[@]}"

echo "building $DEEPSPEED as a pure-Python wheel (no compiled ops: DeepSpeed builds those just in time)"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps -w "$staging" "$DEEPSPEED"

# Anything compiled for the wrong interpreter or platform would only fail on the GPU machine.
for wheel in "$staging"/*.whl; do
    name=$(basename "$wheel")
    case "$name" in
        *-py3-none-any.whl|*-py312-none-any.whl|*-cp312-cp312-*manylinux*x86_64*.whl) ;;
        *) echo "error: $name does not fit CPython 3.12 on manylinux x86_64" >&2; exit 1 ;;
    esac
done
# One version of each distribution (the name is the wheel file name up to the first '-').
duplicates=$(for wheel in "$staging"/*.whl; do basename "$wheel" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort | uniq -d)
if [[ -n "$duplicates" ]]; then
    echo "error: more than one version of: $duplicates" >&2
    exit 1
fi

rm -rf .whl
mkdir .whl
mv "$staging"/*.whl .whl/

# .whl/ travels only when carried; it must never be committed.
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [[ -n "$exclude" ]]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi

ls -1 .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total: $(ls .whl/*.whl | wc -l) wheels, $((total / 1024)) KiB (the device tool carries at most 64 MiB with the tree)"
if (( total > 48 * 1024 * 1024 )); then
    echo "error: .whl/ is over 48 MiB; it would crowd the 64 MiB a call may carry" >&2
    exit 1
fi
