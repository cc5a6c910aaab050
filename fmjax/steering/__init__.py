"""Steering: sample from, or fine-tune toward, the tilted law q(x) ∝ p(x) exp(r(x) / lambda).

Pure functions of arrays (docs/steering.md). `rewards` holds reward functions r(x, labels) ->
[batch]; `tilted` the closed-form tilted Gaussian mixtures the tests compare against;
`lookahead` the estimates of the clean sample a noisy x_t becomes (flow map X_{t,1}, denoiser
E[x1 | x_t], or x_t itself) and the score from a velocity.
"""
