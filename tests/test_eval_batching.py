"""cdx.eval.batching on a TRAINED tiny model: batch 16 gives the same long greedy replies
and the same log-likelihoods as batch 1, with prompts of many lengths (several length
buckets, a short last batch)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cdx.eval import batching
from cdx.models import mllm

PAD, BOS, IMAGE, EOS, ASSISTANT = 0, 1, 2, 3, 4
VOCAB, REPLY, IMAGES = 96, 24, 4


@pytest.fixture(scope="module")
def trained():
  """A tiny MLLM trained until it recites one long reply per image after any prompt."""
  cfg = mllm.make_config(
      dict(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
           mlp_dim=64),
      dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
           head_dim=16, mlp_dim=128, rope_theta=10000.0),
      image_token_id=IMAGE, pad_token_id=PAD, eos_token_id=EOS)
  nv = mllm.num_visual_tokens(cfg)
  rng = np.random.RandomState(0)
  pixels = rng.randn(IMAGES, 16, 16, 3).astype(np.float32)
  replies = [list(rng.randint(10, VOCAB, REPLY)) for _ in range(IMAGES)]

  def prompt(n_words, seed):
    words = list(np.random.RandomState(seed).randint(10, VOCAB, n_words))
    return [BOS] + [IMAGE] * nv + words + [ASSISTANT]

  # Training rows: prompts of 1..12 question words; the loss covers the reply and EOS.
  length = 1 + nv + 12 + 1 + REPLY + 1
  ids = np.full((32, length), PAD, np.int32)
  weights = np.zeros((32, length), np.float32)
  image_of = np.arange(32) % IMAGES
  for r in range(32):
    p = prompt(1 + r % 12, 1000 + r)
    row = p + replies[image_of[r]] + [EOS]
    ids[r, :len(row)] = row
    weights[r, len(p) - 1:len(row) - 1] = 1.0   # predicts reply tokens and EOS
  mask = (ids != PAD).astype(np.int32)
  params = mllm.init_params(cfg, jax.random.key(0))
  opt = optax.adam(3e-3)

  def loss_fn(params):
    logits, _ = mllm.forward(cfg, params, ids, pixels[image_of], mask)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return (nll * weights[:, :-1]).sum() / weights.sum()

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = opt.init(params)
  for _ in range(150):
    params, state, loss = step(params, state)
  # Eval prompts: 20 (a full batch of 16 + a short one), 1..70 question words, so
  # their padded lengths fall in three buckets of 32.
  prompts = [prompt(n, n) for n in (1, 3, 5, 8, 13, 21, 34, 55, 70, 2, 4, 6, 9, 11, 17,
                                    25, 40, 48, 62, 7)]
  image_ids = [i % IMAGES for i in range(len(prompts))]
  return dict(cfg=cfg, params=params, loss=float(loss), pixels=pixels, replies=replies,
              prompts=prompts, image_ids=image_ids)


def _generate(t, batch_size):
  return batching.generate_tokens(t["cfg"], t["params"], t["prompts"],
                                  lambda i: t["pixels"][t["image_ids"][i]], batch_size,
                                  REPLY + 4, EOS, PAD)


def test_buckets_cover_several_lengths(trained):
  lengths = {-(-len(p) // batching.LENGTH_BUCKET) for p in trained["prompts"]}
  assert len(lengths) >= 3
  batches = batching.length_batches([len(p) for p in trained["prompts"]], 16)
  assert [len(b) for b in batches] == [16, 4]
  assert sorted(i for b in batches for i in b) == list(range(len(trained["prompts"])))


@pytest.mark.slow
def test_batch_16_gives_the_replies_of_batch_1(trained):
  assert trained["loss"] < 0.5, trained["loss"]   # it did learn its replies
  one, sixteen = _generate(trained, 1), _generate(trained, 16)
  assert one == sixteen
  # Long, varied replies, mostly the memorized ones: a real test of the cache loop.
  # (Prompts longer than the trained ones may end early; they still must agree.)
  long = [len(r) >= 12 and len(set(r)) >= 8 for r in one]
  assert sum(long) >= len(one) // 2, [len(r) for r in one]
  recited = sum(r == trained["replies"][i] + [EOS]
                for r, i in zip(one, trained["image_ids"]))
  assert recited >= len(one) // 2, recited
  assert len({tuple(r) for r in one}) >= 3


@pytest.mark.slow
def test_batch_16_gives_the_scores_of_batch_1(trained):
  t = trained
  conts = [[t["replies"][i][:5], t["replies"][(i + 1) % IMAGES][:9]] for i in t["image_ids"]]
  score = lambda bs: np.asarray(batching.score_tokens(
      t["cfg"], t["params"], t["prompts"], conts, lambda i: t["pixels"][t["image_ids"][i]],
      bs, PAD))
  one, sixteen = score(1), score(16)
  np.testing.assert_allclose(one, sixteen, rtol=1e-5, atol=1e-5)
  assert (one[:, 0] > one[:, 1]).mean() >= 0.5   # mostly, its own reply is likelier
  # One-token continuations (one row per prompt) agree across batch sizes too.
  conts = [[t["replies"][i][:1], t["replies"][(i + 1) % IMAGES][:1]] for i in t["image_ids"]]
  np.testing.assert_allclose(score(1), score(16), rtol=1e-5, atol=1e-5)
