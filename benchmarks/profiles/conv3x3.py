"""Profile: cost of a 3x3 convolution and of its input and weight gradients on the XLA CPU backend."""
import time, jax, jax.numpy as jnp, numpy as np
x = jnp.asarray(np.random.rand(20, 24, 8, 256).astype(np.float32))
w = jnp.asarray(np.random.rand(3, 3, 256, 256).astype(np.float32) * 0.01)
conv = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
fwd = jax.jit(lambda w, x: conv(w, x).sum())
gw = jax.jit(jax.grad(lambda w, x: (conv(w, x) ** 2).sum(), argnums=0))
gx = jax.jit(jax.grad(lambda w, x: (conv(w, x) ** 2).sum(), argnums=1))
for g, label in ((fwd, "fwd"), (gx, "fwd+grad input"), (gw, "fwd+grad weight")):
  jax.block_until_ready(g(w, x))
  t = time.perf_counter()
  for _ in range(5): jax.block_until_ready(g(w, x))
  print(f"3x3 conv 256->256 on 20x24x8 {label:16s}: {(time.perf_counter() - t) / 5 * 1000:.1f} ms", flush=True)
