"""Profile: forward pass of ResNet-50 (last stride 1) at batch 20 x 384x128 in JAX vs PyTorch (needs torch)."""
import os, pathlib, time, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout
import jax, jax.numpy as jnp, numpy as np, torch, torchvision
from benchmarks.train_step import BackboneAsHead
torch.set_num_threads(os.cpu_count())
m = BackboneAsHead(751)
x = jnp.asarray(np.random.default_rng(0).standard_normal((20, 384, 128, 3), np.float32))
v = jax.jit(lambda r: m.init(r, x[:1]))(jax.random.PRNGKey(0))
f = jax.jit(lambda v, x: m.apply(v, x)["logits"]).lower(v, x).compile()
f(v, x).block_until_ready()
tm = torchvision.models.resnet50(num_classes=751).eval()
tm.layer4[0].conv2.stride = (1, 1); tm.layer4[0].downsample[0].stride = (1, 1)
tx = torch.randn(20, 3, 384, 128)
with torch.no_grad():
  tm(tx)
  for _ in range(2):
    t = time.perf_counter(); f(v, x).block_until_ready(); j = time.perf_counter() - t
    t = time.perf_counter(); tm(tx); p = time.perf_counter() - t
    print(f"forward batch 20: jax {j:.2f} s, torch {p:.2f} s, jax/torch speed {p/j:.2f}", flush=True)
