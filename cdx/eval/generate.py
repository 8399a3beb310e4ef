"""Generation and option scoring with the MLLM's functional KV cache (pure functions).

  generate(cfg, params, input_ids, attention_mask, pixel_values, max_new_tokens, eos_id,
           pad_id, rng=None, temperature=0.0, top_k=0, top_p=1.0)
      -> tokens int32 [B, max_new_tokens] (pad_id after a row's EOS), lengths int32 [B]
  score_options(cfg, params, input_ids, attention_mask, pixel_values, options)
      -> float32 [B, K]: log P(option k | prompt b), summed over the option's tokens
  score_continuations(..., continuations)   the same with K continuations per prompt

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

@functools.partial(jax.jit, static_argnames=("cfg", "rows_per_prompt"))
def _token_logprobs(cfg, params, input_ids, attention_mask, pixel_values, positions,
                    targets, *, rows_per_prompt):
  """float32 [R, T]: log P(targets[r, t] | hidden[r, positions[r, t]]); rows come in
  groups of rows_per_prompt per image. Only those positions reach the LM head."""
  image = _image_embeds(cfg, params, pixel_values)
  if image is not None:  # vision once per prompt, shared by its rows
    image = jnp.repeat(image, rows_per_prompt, axis=0)
  embeds = mllm.embed(cfg, params, input_ids, image)
  hidden, _ = mllm.decode(cfg, params, embeds, attention_mask)
  h = jnp.take_along_axis(hidden, positions[..., None], axis=1)    # [R, T, D]
  kernel = mllm.lm_head_kernel(cfg, params).astype(h.dtype)
  logits = jnp.einsum("rtd,dv->rtv", h, kernel, preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def score_continuations(cfg: mllm.MllmConfig, params: dict, input_ids, attention_mask,
                        pixel_values, continuations, pad_id: int = 0,
                        length_multiple: int = 1) -> jax.Array:
  """float32 [B, K] log-likelihood of continuation k of prompt b, summed over its tokens.

  continuations: B lists (one per prompt) of K non-empty token-id sequences each, e.g.
  the ids of two captions. One forward pass: when every continuation is one token (" A"
  / " B", " Yes") over the B prompts, all K read at the prompt's last position; else over
  B*K rows (prompt b's real tokens + continuation k). Rows are right padded to a multiple
  of `length_multiple`, so that few shapes compile; the vision tower runs once per prompt.
  """
  _check_prompts(cfg, input_ids, attention_mask, pixel_values)
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  conts = [[list(map(int, c)) for c in row] for row in continuations]
  k = len(conts[0]) if conts else 0
  if (len(conts) != len(ids) or not k or any(len(row) != k for row in conts)
      or any(not c for row in conts for c in row)):
    raise ValueError(f"continuations must hold {len(ids)} lists (one per prompt) of the "
                     f"same number (>= 1) of non-empty token id sequences; got "
                     f"{[[len(c) for c in row] for row in conts]!r}.")
  n = mask.sum(-1)
  pixels = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
  longest = max(len(c) for row in conts for c in row)
  if longest == 1:   # next-token scores: one row per prompt
    width = _round_up(ids.shape[1], length_multiple)
    rows = np.full((len(ids), width), pad_id, np.int32)
    rows[:, :ids.shape[1]] = ids
    row_mask = np.zeros_like(rows)
    row_mask[:, :mask.shape[1]] = mask
    positions = np.repeat((n - 1)[:, None], k, axis=1).astype(np.int32)
    targets = np.asarray([[c[0] for c in row] for row in conts], np.int32)
    return _token_logprobs(cfg, params, jnp.asarray(rows), jnp.asarray(row_mask), pixels,
                           jnp.asarray(positions), jnp.asarray(targets), rows_per_prompt=1)
  width = _round_up(int(n.max()) + longest, length_multiple)
  span = _round_up(longest, min(length_multiple, 8))
  rows = np.full((len(ids) * k, width), pad_id, np.int32)
  row_mask = np.zeros_like(rows)
  positions = np.zeros((len(rows), span), np.int32)
  targets = np.zeros((len(rows), span), np.int32)
  valid = np.zeros((len(rows), span), bool)
  for b in range(len(ids)):
    for j, cont in enumerate(conts[b]):
      r, m, end = b * k + j, int(n[b]), int(n[b]) + len(cont)
      rows[r, :m], rows[r, m:end], row_mask[r, :end] = ids[b, :m], cont, 1
      # Token t of the continuation is predicted by the hidden state just before it.
      positions[r, :len(cont)] = np.arange(m - 1, end - 1)
      targets[r, :len(cont)], valid[r, :len(cont)] = cont, True
  logp = _token_logprobs(cfg, params, jnp.asarray(rows), jnp.asarray(row_mask), pixels,
                         jnp.asarray(positions), jnp.asarray(targets), rows_per_prompt=k)
  return jnp.where(jnp.asarray(valid), logp, 0.0).sum(-1).reshape(-1, k)


def score_options(cfg: mllm.MllmConfig, params: dict, input_ids, attention_mask,
                  pixel_values, options, pad_id: int = 0) -> jax.Array:
  """float32 [B, K] log-likelihood of each option's tokens after each prompt.

  options: K non-empty token-id sequences (e.g. the ids of " Yes" and " No"), shared by
  every prompt (`score_continuations` with the same options for each prompt).
  P(option) = exp of the result.
  """
  options = [list(map(int, o)) for o in options]
  if not options or any(not o for o in options):
    raise ValueError(f"options={options!r} must be a non-empty list of non-empty token "
                     "id sequences.")
  return score_continuations(cfg, params, input_ids, attention_mask, pixel_values,
                             [options] * len(np.asarray(input_ids)), pad_id)
