#!/usr/bin/env bash
# Fetch into .whl/ the wheels of llm_jax's dependencies that the H200 device image lacks
# (/work/.library/device/KINDS.md lists what it has): pydantic and its own, and zstandard, as
# CPython 3.12 x86-64 builds at the versions installed in this checkout's .venv. Then name .whl in
# the device tool's carry; experiments/gpu_issue19.sh installs them beside the image's packages.
#   usage: experiments/gpu_wheels.sh   (from the repository root; needs the package registry)
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
mkdir -p .whl
names=(pydantic pydantic-core annotated-types typing-inspection typing-extensions zstandard)
pins=()
for name in "${names[@]}"; do
  pins+=("$name==$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls .whl
