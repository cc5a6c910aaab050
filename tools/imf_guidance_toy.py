"""Toy check that iMF's guidance input acts like guidance: two labelled 2-D Gaussians.

  PYTHONPATH=. .venv/bin/python tools/imf_guidance_toy.py [STEPS=2000]

Trains `imf` with guidance_conditioning=True (fmjax.losses.imf; iMF, arXiv 2512.02012) on
N((+-1.5, 0), 0.5^2 I) with labels, then samples class 1 with the guidance scale w fed to the
network (1 evaluation per step) and prints the class-1 mean along x (1.5 without guidance;
guidance pushes it away from class 0) and the spread across (0.5 without guidance).
"""
import sys, time
import jax, jax.numpy as jnp, optax
from fmjax import flow_maps, interpolants, losses, models, samplers
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
MU = jnp.array([[-1.5, 0.0], [1.5, 0.0]]); SD = 0.5
module = models.build('mlp', dim=2, hidden=128, depth=3, num_classes=2, time_conditioning='t_gap',
                      guidance_conditioning=True, seed=0)
apply, net = models.functional(module)
fm = flow_maps.make('meanflow', apply)
rule = losses.make('imf', fm, interpolants.get('linear'), guidance_conditioning=True, null_label=2,
                   label_dropout=0.2, weighting='none')
params = rule.init(net)
opt = optax.adam(1e-3); state = opt.init(params)

@jax.jit
def step(params, state, key):
  k1, k2, k3 = jax.random.split(key, 3)
  y = jax.random.bernoulli(k1, 0.5, (256,)).astype(jnp.int32)
  x1 = MU[y] + SD * jax.random.normal(k2, (256, 2))
  (loss, m), g = jax.value_and_grad(rule, has_aux=True)(params, {'x1': x1, 'labels': y}, k3)
  u, state = opt.update(g, state, params)
  return optax.apply_updates(params, u), state, loss

t0 = time.time(); key = jax.random.PRNGKey(0)
for i in range(steps):
  key, k = jax.random.split(key)
  params, state, loss = step(params, state, k)
print(f'{steps} steps in {time.time() - t0:.0f} s, last loss {float(loss):.3f}')
x0 = jax.random.normal(jax.random.PRNGKey(1), (4096, 2)); y = jnp.ones(4096, jnp.int32)
for w in (1.0, 2.0, 4.0):
  for k in (1, 2):
    x = samplers.flow_map_sample(fm, params['net'], x0, samplers.uniform_grid(k), y,
                                 null_label=2, guidance_scale=w, guidance_input=True)
    print(f'w={w} steps={k}: class-1 mean x {float(x[:, 0].mean()):+.3f}, '
          f'share on the class-0 side {float((x[:, 0] < 0).mean()):.4f}, std y {float(x[:, 1].std()):.3f}')
