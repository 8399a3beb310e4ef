"""cdx.eval.generate: greedy tokens == HF generate on a tiny random LLaVA (batched prompts
of different lengths, one image each), EOS stopping, sampling, option scoring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_fixtures as F
from cdx import hf
from cdx.eval import generate as gen
from cdx.models import mllm

NV = F.NUM_VISUAL
STEPS = 6


def _prompts(rng):
  """Two right-padded prompts: [text, image block, text] of different lengths."""
  rows = [[5, 7] + [F.IMAGE_TOKEN] * NV + list(rng.randint(1, 100, 9)),
          list(rng.randint(1, 100, 4)) + [F.IMAGE_TOKEN] * NV + [11, 12]]
  length = max(map(len, rows))
  ids = np.full((2, length), F.PAD, np.int32)
  mask = np.zeros((2, length), np.int32)
  for b, r in enumerate(rows):
    ids[b, :len(r)], mask[b, :len(r)] = r, 1
  return ids, mask


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava"))
  model = F.save_llava(path, gqa=True, tie=False)
  cfg, params = hf.load_llava(path)
  rng = np.random.RandomState(1)
  ids, mask = _prompts(rng)
  pixels = rng.randn(2, F.IMAGE, F.IMAGE, 3).astype(np.float32)
  return dict(model=model, cfg=cfg, params=params, ids=ids, mask=mask, pixels=pixels)


def _hf_generate(llava, b, steps, eos_id):
  n = int(llava["mask"][b].sum())
  with torch.no_grad():
    out = llava["model"].generate(
        input_ids=torch.from_numpy(llava["ids"][b:b + 1, :n]).long(),
        pixel_values=torch.from_numpy(llava["pixels"][b:b + 1]).permute(0, 3, 1, 2),
        max_new_tokens=steps, do_sample=False, eos_token_id=eos_id, pad_token_id=F.PAD)
  return out[0, n:].numpy()


def _run(llava, steps=STEPS, eos_id=None, **kw):
  tokens, lengths = gen.generate(llava["cfg"], llava["params"], llava["ids"], llava["mask"],
                                 llava["pixels"], steps, eos_id, F.PAD, **kw)
  return np.asarray(tokens), np.asarray(lengths)


def test_greedy_matches_hf_generate(llava):
  tokens, lengths = _run(llava)
  assert tokens.shape == (2, STEPS) and tokens.dtype == np.int32
  np.testing.assert_array_equal(lengths, [STEPS, STEPS])
  for b in range(2):
    np.testing.assert_array_equal(tokens[b], _hf_generate(llava, b, STEPS, None))
  # The rows differ, so batching did not mix them up.
  assert not np.array_equal(tokens[0], tokens[1])


def test_stops_at_eos_and_pads(llava):
  free, _ = _run(llava)
  eos = int(free[0, 2])  # row 0 emits it at step 2 (maybe earlier too)
  first = int(np.flatnonzero(free[0] == eos)[0])
  tokens, lengths = _run(llava, eos_id=eos)
  assert lengths[0] == first + 1
  np.testing.assert_array_equal(tokens[0, :first + 1], free[0, :first + 1])
  assert (tokens[0, first + 1:] == F.PAD).all()
  hits = np.flatnonzero(free[1] == eos)
  want1 = int(hits[0]) + 1 if len(hits) else STEPS
  assert lengths[1] == want1
  np.testing.assert_array_equal(tokens[1, :want1], free[1, :want1])
  for b in range(2):  # HF stops at the same place
    np.testing.assert_array_equal(tokens[b, :lengths[b]], _hf_generate(llava, b, STEPS, eos))


def test_stops_when_every_row_is_done(llava):
  # With EOS = the first token of both rows (force it equal by using one row twice).
  one = {**llava, "ids": llava["ids"][[0, 0]], "mask": llava["mask"][[0, 0]],
         "pixels": llava["pixels"][[0, 0]]}
  free, _ = _run(one)
  tokens, lengths = _run(one, eos_id=int(free[0, 0]))
  np.testing.assert_array_equal(lengths, [1, 1])
  assert (tokens[:, 1:] == F.PAD).all()


def test_sampling_reproducible_and_top_k_1_is_greedy(llava):
  greedy, _ = _run(llava)
  a, _ = _run(llava, rng=jax.random.key(3), temperature=1.5)
  b, _ = _run(llava, rng=jax.random.key(3), temperature=1.5)
  np.testing.assert_array_equal(a, b)
  draws = [_run(llava, rng=jax.random.key(s), temperature=5.0)[0] for s in range(4)]
  assert any(not np.array_equal(d, draws[0]) for d in draws[1:])  # it does sample
  k1, _ = _run(llava, rng=jax.random.key(4), temperature=2.0, top_k=1)
  np.testing.assert_array_equal(k1, greedy)
  tiny_p, _ = _run(llava, rng=jax.random.key(5), temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(tiny_p, greedy)


def test_sampling_probs():
  logits = jnp.asarray(np.random.RandomState(0).randn(3, 50).astype(np.float32))
  for t, k, p in ((1.0, 0, 1.0), (0.7, 5, 1.0), (2.0, 0, 0.5), (1.0, 10, 0.8)):
    probs = np.asarray(gen.sampling_probs(logits, t, k, p))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert (probs >= 0).all()
    if k:
      assert ((probs > 0).sum(-1) <= k).all()
  full = np.asarray(gen.sampling_probs(logits, 2.0, 0, 1.0))
  np.testing.assert_allclose(full, jax.nn.softmax(logits / 2.0), rtol=1e-5)
  # Top-p keeps the smallest top set whose mass reaches p.
  nucleus = np.asarray(gen.sampling_probs(logits, 1.0, 0, 0.5))
  ref = np.asarray(jax.nn.softmax(logits))
  for row, kept in zip(ref, nucleus > 0):
    order = np.argsort(-row)
    need = int(np.searchsorted(np.cumsum(row[order]), 0.5) + 1)
    assert set(order[:need]) == set(np.flatnonzero(kept))


@pytest.mark.slow
def test_score_options_match_forward(llava):
  cfg, params = llava["cfg"], llava["params"]
  forward = jax.jit(mllm.forward, static_argnums=0)
  # Multi-token options (a row per option) and one-token options (one row per prompt).
  for options in ([[17], [23, 40, 41]], [[17], [23], [5]]):
    got = np.asarray(gen.score_options(cfg, params, llava["ids"], llava["mask"],
                                       llava["pixels"], options, pad_id=F.PAD))
    assert got.shape == (2, len(options)) and (got < 0).all()
    for b in range(2):
      n = int(llava["mask"][b].sum())
      for k, opt in enumerate(options):
        ids = np.concatenate([llava["ids"][b, :n], opt])[None].astype(np.int32)
        logits, _ = forward(cfg, params, jnp.asarray(ids),
                            jnp.asarray(llava["pixels"][b:b + 1]))
        logp = jax.nn.log_softmax(logits[0], -1)
        want = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(opt))
        np.testing.assert_allclose(got[b, k], want, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise(llava):
  cfg, params = llava["cfg"], llava["params"]
  ids, mask, pixels = llava["ids"], llava["mask"], llava["pixels"]
  with pytest.raises(ValueError, match="right-padded"):
    gen.generate(cfg, params, ids, mask[:, ::-1], pixels, 2, None, F.PAD)
  with pytest.raises(ValueError, match="rng"):
    gen.generate(cfg, params, ids, mask, pixels, 2, None, F.PAD, temperature=1.0)
  with pytest.raises(ValueError, match="top_p"):
    gen.generate(cfg, params, ids, mask, pixels, 2, None, F.PAD, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.generate(cfg, params, ids, mask, pixels, 0, None, F.PAD)
  with pytest.raises(ValueError, match="pixel_values is None"):
    gen.generate(cfg, params, ids, mask, None, 2, None, F.PAD)
  with pytest.raises(ValueError, match="options"):
    gen.score_options(cfg, params, ids, mask, pixels, [[]])
