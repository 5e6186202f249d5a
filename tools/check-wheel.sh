#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh virtual environment, and run a few-step
# `threedistill generate` from an empty temporary folder: the check that a `pip install threedistill`
# works outside the source tree (presets and weights are package data). Used by .ci/run; run it by
# hand the same way: `bash tools/check-wheel.sh` from the repository root with a Python that has
# pip (and setuptools for the build, or network for pip's isolated build).
# Prints the wheel's size and the generate time; exits non-zero when anything is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
py="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/threedistill-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Build from a copy of the working tree's files (tracked and new, not ignored): setuptools writes
# build/ and *.egg-info next to the sources, and a stale build/ could leak removed files into the wheel.
mkdir "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -C "$repo" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work/src"
"$py" -m pip wheel --no-deps --quiet -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/threedistill-*.whl)"
echo "wheel: $(basename "$wheel") $(du -k "$wheel" | cut -f1) KiB"

"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet torch==2.13.0
"$work/venv/bin/python" -m pip install --quiet "$wheel"

mkdir "$work/empty"
cd "$work/empty"
start=$(date +%s)
HF_HUB_OFFLINE=1 "$work/venv/bin/threedistill" presets >/dev/null
HF_HUB_OFFLINE=1 "$work/venv/bin/threedistill" generate "a red cube" run.steps=3 --out runs
glb="$(find runs -name '*.glb' -size +0 | head -n 1)"
if [ -z "$glb" ]; then
    echo "check-wheel: no GLB written by the installed wheel's generate" >&2
    exit 1
fi
echo "check-wheel: the installed wheel generated $glb in $(( $(date +%s) - start )) s from an empty folder"
