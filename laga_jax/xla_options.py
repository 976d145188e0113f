"""XLA compiler options for the project's training programs, per platform.

On CPUs with AVX-512, XLA:CPU (jaxlib 0.10 and 0.12) hands float32 convolutions to YNNPACK. There, its
weight-gradient convolutions (a window as large as the feature map) ran 1.7-4.5x slower than XLA's Eigen
kernels and its forward convolutions up to 2.1x slower, per ResNet-50 shape at batch 20 x 384x128 on a
2-core Xeon (benchmarks/RESULTS.md, "On an Intel Xeon with AVX-512"). Leaving convolutions to Eigen and
YNNPACK the matrix products and reductions took the full LAGA-Net train step from 26.3 s to 20.5 s there.
GPUs and TPUs get no options: they have their own convolution libraries. `jax.pmap` takes no compiler
options, so with `config.train.parallel = "pmap"` the step compiles with XLA's defaults.
"""

import functools
import logging
from typing import Dict, Optional

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# YNNPACK for dots and reductions only: this jaxlib's default list less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=None)
def host_has_avx512() -> bool:
  """Whether this machine's CPU has AVX-512 (Linux /proc/cpuinfo; False where it cannot be read).

  `resnet.conv2d` picks its CPU weight gradient by it: GEMMs without AVX-512, XLA's own with it.
  """
  try:
    with open("/proc/cpuinfo") as f:
      return any(line.startswith("flags") and " avx512f" in line for line in f)
  except OSError:
    return False


@functools.lru_cache(maxsize=None)
def compiler_options(platform: str) -> Optional[Dict[str, str]]:
  """`jax.jit(..., compiler_options=...)` for programs that run on `platform` ("cpu", "gpu", "tpu").

  None where no option applies, or where this jaxlib does not know CPU_OPTIONS (checked once by compiling
  a scalar program with them), so that an XLA without YNNPACK compiles with its own defaults.
  """
  if platform != "cpu":
    return None
  try:
    scalar = jax.device_put(jnp.float32(0), jax.devices("cpu")[0])
    jax.jit(jnp.negative, compiler_options=CPU_OPTIONS).lower(scalar).compile()
  except Exception as error:  # noqa: BLE001  (XLA raises its own runtime error type for an unknown option)
    log.info("XLA:CPU options %s not supported by this jaxlib (%s); using XLA's defaults", CPU_OPTIONS, error)
    return None
  return dict(CPU_OPTIONS)
