#!/usr/bin/env bash
# One-GPU benchmark table (benchmarks/gpu.py): EDM DDPM++ CIFAR-10 and ADM ImageNet-64, fp32 and bf16,
# diffjax vs PyTorch (diffusers UNet2DModel, torch.autocast). Needs: jax[cuda], flax, optax,
# ml_collections (diffjax's requirements), torch and diffusers. About 8 minutes with compilation.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so peak memory is what the step uses
exec timeout 480 python benchmarks/gpu.py --json="${1:-/tmp/gpu_bench.json}" "${@:2}"
