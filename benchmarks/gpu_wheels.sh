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
# Ray's wheel alone is ~80 MB: where what a call can carry is smaller, the script also splits every
# wheel over 60 MB into DIR/parts/NAME.part-aa, -ab, … (`cat DIR/parts/NAME.part-* > NAME` joins
# them), so the parts can travel in separate calls.
set -euo pipefail

dir=${1:-.whl}
mkdir -p "$dir"
python=${PYTHON:-.venv/bin/python}
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# The versions pyproject.toml pins, and what they import that the GPU image lacks.
"$python" -m pip download -q --no-deps "${platform[@]}" -d "$dir" \
    "ray==2.60.0" "trl==1.16.0" "transformers>=5.19,<5.20" "datasets>=4.7" dill multiprocess \
    pydantic pydantic-core annotated-types typing-inspection \
    jsonschema jsonschema-specifications referencing rpds-py hjson
# DeepSpeed publishes only a source distribution: build its wheel here (ops compile just in time).
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==0.19.8"

mkdir -p "$dir/parts"
for wheel in "$dir"/*.whl; do
    if [ "$(stat -c %s "$wheel")" -gt $((60 * 1024 * 1024)) ]; then
        split -b 60M "$wheel" "$dir/parts/$(basename "$wheel").part-"
    fi
done
du -sh "$dir"/*.whl | sort -h | tail -5
