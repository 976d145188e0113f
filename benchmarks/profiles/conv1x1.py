"""Profile: a 1x1 convolution as lax.conv vs einsum, forward and forward+backward, on the XLA CPU backend."""
import time, jax, jax.numpy as jnp, numpy as np
x = jnp.asarray(np.random.rand(20, 24, 8, 1024).astype(np.float32))   # layer4 input (last stride 1)
w = jnp.asarray(np.random.rand(1, 1, 1024, 512).astype(np.float32) * 0.01)
conv = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
dot = lambda w, x: jnp.einsum("bhwc,cd->bhwd", x, w[0, 0])
for name, f in (("conv", conv), ("einsum", dot)):
  fwd = jax.jit(lambda w, x: f(w, x).sum())
  grad = jax.jit(jax.grad(lambda w, x: (f(w, x) ** 2).sum(), argnums=(0, 1)))
  for g, label in ((fwd, "fwd"), (grad, "fwd+bwd")):
    jax.block_until_ready(g(w, x))
    t = time.perf_counter()
    for _ in range(5): jax.block_until_ready(g(w, x))
    print(f"1x1 conv 1024->512 on 20x24x8, {name:6s} {label:8s}: {(time.perf_counter() - t) / 5 * 1000:.1f} ms", flush=True)
