"""Generation and option scoring with the MLLM's functional KV cache (pure functions).

  generate(cfg, params, input_ids, attention_mask, pixel_values, max_new_tokens, eos_id,
           pad_id, rng=None, temperature=0.0, top_k=0, top_p=1.0)
      -> tokens int32 [B, max_new_tokens] (pad_id after a row's EOS), lengths int32 [B]
  score_options(cfg, params, input_ids, attention_mask, pixel_values, options)
      -> float32 [B, K]: log P(option k | prompt b), summed over the option's tokens

Inputs: input_ids int [B, L] right-padded prompts holding 0 or Nv image-token ids per row
(see cdx/models/mllm.py), attention_mask int [B, L] (ones then zeros), pixel_values
float32 [B, H, W, 3] (NHWC, normalized) or None for a text-only batch.

`generate` runs the vision tower and the prompt once (prefill into a cache of L +
max_new_tokens slots), then a jitted `lax.while_loop` feeds one token per row per step and
stops when every row has emitted EOS or max_new_tokens tokens exist. `lengths[b]` counts
row b's tokens up to and including its EOS. temperature == 0 is greedy (argmax, as HF
`do_sample=False`); otherwise tokens are drawn from `sampling_probs`: logits / temperature,
then top-k, then top-p (nucleus) filtering, as HF's sampling warpers do.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cdx.models import mllm


# ------------------------------------------------------------------------------ sampling

def sampling_probs(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """float [B, V] logits -> float32 [B, V] probabilities after temperature/top-k/top-p.

  temperature > 0; top_k == 0 keeps every token; top_p == 1 keeps every token. Top-p
  keeps the most likely tokens until their mass reaches top_p (always at least one).
  Arguments may be traced scalars (one compiled loop serves every setting).
  """
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  order = jnp.argsort(-logits, axis=-1)  # descending; stable, so ties keep id order
  ranked = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(vocab)
  keep = (top_k <= 0) | (rank < top_k)
  ranked = jnp.where(keep, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better-ranked tokens
  # top_p >= 1 must keep everything even when float cumsums overshoot 1.
  keep = keep & ((top_p >= 1.0) | (before < top_p))
  ranked = jnp.where(keep, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(probs, inverse, axis=-1)


def next_token(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """int32 [B]: argmax when temperature == 0, else a draw from `sampling_probs`."""
  def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample(logits):
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)

  # A real branch: greedy decoding skips the vocab-wide sort of the sampling path.
  return jax.lax.cond(temperature > 0, sample, greedy, logits)


# ------------------------------------------------------------------------------ prefill

def _image_embeds(cfg, params, pixel_values):
  """The model's image embeddings [B, Nv, D] (`mllm.image_embeds`); None without images."""
  return None if pixel_values is None else mllm.image_embeds(cfg, params, pixel_values)


def _last_logits(cfg, params, hidden, positions):
  """float32 [B, V] logits at hidden[b, positions[b]] (only those rows hit the LM head)."""
  h = jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0]
  kernel = mllm.lm_head_kernel(cfg, params).astype(h.dtype)
  return jnp.einsum("bd,dv->bv", h, kernel, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------ generate

@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(cfg, params, input_ids, attention_mask, pixel_values, rng, temperature,
              top_k, top_p, eos_id, pad_id, *, max_new_tokens):
  # Sampling settings and special ids are traced: one compiled loop per shape serves all.
  batch, length = input_ids.shape
  embeds = mllm.embed(cfg, params, input_ids, _image_embeds(cfg, params, pixel_values))
  cache = mllm.init_cache(cfg, batch, length + max_new_tokens)
  hidden, inter = mllm.decode(cfg, params, embeds, attention_mask, cache=cache)
  last = jnp.maximum(attention_mask.sum(-1) - 1, 0)
  logits = _last_logits(cfg, params, hidden, last)

  rng, sub = jax.random.split(rng)
  token = next_token(logits, sub, temperature, top_k, top_p)
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  done = token == eos_id
  ones = jnp.ones((batch, 1), jnp.int32)

  def cond(state):
    step, _, _, _, done, _ = state
    return (step < max_new_tokens) & ~done.all()

  def body(state):
    step, cache, token, tokens, done, rng = state
    x = mllm.embed(cfg, params, token[:, None], None)
    hidden, inter = mllm.decode(cfg, params, x, ones, cache=cache)
    logits = _last_logits(cfg, params, hidden, jnp.zeros((batch,), jnp.int32))
    rng, sub = jax.random.split(rng)
    # Finished rows keep feeding pad tokens into their own cache; their output is unused.
    token = jnp.where(done, pad_id, next_token(logits, sub, temperature, top_k, top_p))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
    return step + 1, inter["cache"], token, tokens, done | (token == eos_id), rng

  state = (jnp.int32(1), inter["cache"], token, tokens, done, rng)
  _, _, _, tokens, _, _ = jax.lax.while_loop(cond, body, state)
  is_eos = tokens == eos_id
  lengths = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
  return tokens, lengths.astype(jnp.int32)


def _check_prompts(cfg, input_ids, attention_mask, pixel_values) -> None:
  """Host-side checks of concrete inputs: shapes, right padding, image-token counts."""
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  if ids.ndim != 2 or mask.shape != ids.shape:
    raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be "
                     "[B, L].")
  n = mask.sum(-1)
  if (n < 1).any():
    raise ValueError(f"rows {np.flatnonzero(n < 1).tolist()} of attention_mask are empty; "
                     "every prompt needs at least one token.")
  if not (mask == (np.arange(mask.shape[1])[None] < n[:, None])).all():
    raise ValueError("attention_mask must be right-padded (ones, then zeros) in every row; "
                     "left-padded prompts are not supported by the KV cache.")
  if pixel_values is None:
    if (ids == cfg.image_token_id).any():
      raise ValueError("input_ids hold image tokens but pixel_values is None.")
  else:
    mllm._check_pixels(cfg, ids, pixel_values)  # pylint: disable=protected-access
    mllm.visual_positions(ids, cfg.image_token_id, mllm.num_visual_tokens(cfg))


def generate(cfg: mllm.MllmConfig, params: dict, input_ids, attention_mask, pixel_values,
             max_new_tokens: int, eos_id: int | None, pad_id: int, rng=None,
             temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Greedy or sampled continuations; see the module docstring.

  eos_id None never stops early. rng (a jax key) is required when temperature > 0.
  Returns tokens int32 [B, max_new_tokens] and lengths int32 [B].
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"temperature={temperature} (>= 0), top_k={top_k} (>= 0) and "
                     f"top_p={top_p} (in (0, 1]) are out of range.")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed).")
  _check_prompts(cfg, input_ids, attention_mask, pixel_values)
  rng = jax.random.key(0) if rng is None else rng
  pixels = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
  return _generate(cfg, params, jnp.asarray(input_ids, jnp.int32),
                   jnp.asarray(attention_mask, jnp.int32), pixels, rng,
                   jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                   jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                   max_new_tokens=int(max_new_tokens))


# ------------------------------------------------------------------------------ scoring

@functools.partial(jax.jit, static_argnames=("cfg", "num_options"))
def _score(cfg, params, input_ids, attention_mask, pixel_values, option_mask, *,
           num_options):
  """Sum of log P(token) over option_mask for rows = prompt b x option k (b-major)."""
  image = _image_embeds(cfg, params, pixel_values)
  if image is not None:  # vision once per prompt, shared by its K option rows
    image = jnp.repeat(image, num_options, axis=0)
  embeds = mllm.embed(cfg, params, input_ids, image)
  hidden, _ = mllm.decode(cfg, params, embeds, attention_mask)
  kernel = mllm.lm_head_kernel(cfg, params).astype(hidden.dtype)
  logits = jnp.einsum("bld,dv->blv", hidden[:, :-1], kernel,
                      preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  target = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(option_mask[:, 1:], target, 0.0), axis=-1)
  return total.reshape(-1, num_options)


def score_options(cfg: mllm.MllmConfig, params: dict, input_ids, attention_mask,
                  pixel_values, options, pad_id: int = 0) -> jax.Array:
  """float32 [B, K] log-likelihood of each option's tokens after each prompt.

  options: K non-empty token-id sequences (e.g. the ids of " Yes" and " No"), shared by
  every prompt. One forward pass over B*K rows (prompt b's real tokens + option k, right
  padded); the vision tower runs once per prompt. P(option) = exp of the result.
  """
  _check_prompts(cfg, input_ids, attention_mask, pixel_values)
  options = [list(map(int, o)) for o in options]
  if not options or any(not o for o in options):
    raise ValueError(f"options={options!r} must be a non-empty list of non-empty token "
                     "id sequences.")
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  n = mask.sum(-1)
  width = int(n.max()) + max(len(o) for o in options)
  rows = np.full((len(ids) * len(options), width), pad_id, np.int32)
  row_mask = np.zeros_like(rows)
  opt_mask = np.zeros(rows.shape, bool)
  for b in range(len(ids)):
    for k, opt in enumerate(options):
      r, end = b * len(options) + k, int(n[b]) + len(opt)
      rows[r, :n[b]], rows[r, n[b]:end] = ids[b, :n[b]], opt
      row_mask[r, :end], opt_mask[r, n[b]:end] = 1, True
  pixels = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
  return _score(cfg, params, jnp.asarray(rows), jnp.asarray(row_mask), pixels,
                jnp.asarray(opt_mask), num_options=len(options))
