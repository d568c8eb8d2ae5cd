#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh needs on a GPU machine that has Python 3.12, PyTorch,
# transformers' own dependencies (tokenizers, safetensors, huggingface_hub), accelerate, pyarrow,
# rich, typer and pytest, but no network: run this where pip reaches a package index.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default .whl (add `/.whl/` to .git/info/exclude)
#
# Then, on the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
#   bash benchmarks/gpu_check.sh
# The wheels come to ~95 MB (Ray's alone ~76 MB), more than one call to a lent GPU machine carries
# (64 MiB with the ~12 MB working tree). So they are also packed as one tar in 40 MB parts,
# DIR/parts/wheels.tar.part-aa, -ab, -ac, one carried per call while the machine stays warm:
#   mkdir -p /root/parts && cp DIR/parts/wheels.tar.part-* /root/parts/       # each call (carry: one part)
#   cat /root/parts/wheels.tar.part-* | tar x -C /root && \
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site /root/wheels/*.whl   # the last call
set -euo pipefail

dir=${1:-.whl}
mkdir -p "$dir"
python=${PYTHON:-.venv/bin/python}
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# What the package imports that the GPU image lacks, at the versions installed in this venv (the
# ones the test suite passed with).
names=(ray trl transformers datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection
       jsonschema jsonschema-specifications referencing rpds-py hjson)
pins=$("$python" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' \
       "${names[@]}")
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps "${platform[@]}" -d "$dir" $pins
# DeepSpeed publishes only a source distribution: build its wheel here (ops compile just in time).
ds=$("$python" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$ds"

rm -rf "$dir/parts" && mkdir -p "$dir/parts"
tar c -C "$dir" --transform 's,^,wheels/,' $(cd "$dir" && ls *.whl) | split -b 40M - "$dir/parts/wheels.tar.part-"
du -sh "$dir"/*.whl | sort -h | tail -3
ls -l "$dir/parts"
