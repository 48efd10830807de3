#!/usr/bin/env bash
# Run HERE (where the package registry answers), not on the GPU machine (which reaches
# nothing): downloads, into benchmarks/gpu/wheels, the wheels of the packages that the
# machine's image lacks (.library/device/KINDS.md lists what it has), for its Python
# (3.12, x86-64 manylinux). run.py installs them there with --no-index --no-deps, so
# each package's own missing needs are named here too: ftfy needs wcwidth; open_clip's
# other needs (torch, torchvision, regex, tqdm, huggingface_hub, safetensors, timm) and
# faiss-cpu's (numpy, packaging) are in the image. Each is optional: without the folder
# the tests and benchmark rows that need one skip.
#   PY_VERSION=3.11 benchmarks/gpu/fetch_wheels.sh      # another Python on the machine
set -euo pipefail
cd "$(dirname "$0")"
PY_VERSION="${PY_VERSION:-3.12}"
PACKAGES=(open_clip_torch ftfy wcwidth faiss-cpu)
rm -rf wheels  # one version of each: two of one package stop the whole install there
mkdir wheels
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --dest wheels \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    "${PACKAGES[@]}"
# the device tool carries at most 64 MiB in all, checkout included
du -ch wheels/*.whl | tail -1
