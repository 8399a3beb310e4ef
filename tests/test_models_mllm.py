"""Full MLLM: logits and captured visual attention vs HF LlavaForConditionalGeneration
(SigLIP + Qwen2, eager attention), functional API pieces, initialisation, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_fixtures as F
from cdx import hf
from cdx.models import adapter, mllm

NV = F.NUM_VISUAL
LENGTH = NV + 12


def _row(rng, offset, n_text_after, with_image=True):
  """[text * offset, image * NV, text * n_after] right-padded to LENGTH, + its mask."""
  body = list(rng.randint(1, 100, size=offset))
  if with_image:
    body += [F.IMAGE_TOKEN] * NV
  body += list(rng.randint(1, 100, size=n_text_after))
  ids = np.full(LENGTH, F.PAD, np.int32)
  ids[:len(body)] = body
  return ids, (np.arange(LENGTH) < len(body)).astype(np.int32)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava"))
  model = F.save_llava(path, gqa=True, tie=False)
  cfg, params = hf.load_llava(path)
  rng = np.random.RandomState(0)
  rows = [_row(rng, 2, 10), _row(rng, 5, 3), _row(rng, 9, 0, with_image=False)]
  ids = np.stack([r[0] for r in rows])
  mask = np.stack([r[1] for r in rows])
  pixels = rng.randn(3, F.IMAGE, F.IMAGE, 3).astype(np.float32)
  pixels[2] = 0.0  # text-only sample: zero image, no image tokens
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                pixel_values=torch.from_numpy(pixels[:2]).permute(0, 3, 1, 2),
                output_attentions=True)
  return dict(cfg=cfg, params=params, ids=ids, mask=mask, pixels=pixels, out=out,
              path=path)


def test_config_read_from_hf(llava):
  cfg = llava["cfg"]
  assert cfg.image_token_id == F.IMAGE_TOKEN and cfg.feature_layer == -2
  assert mllm.num_visual_tokens(cfg) == NV and cfg.text.num_kv_heads == 2


def test_logits_match_hf_offsets_padding_text_only(llava):
  fwd = jax.jit(mllm.forward, static_argnums=0)
  logits, _ = fwd(llava["cfg"], llava["params"], jnp.asarray(llava["ids"]),
                           jnp.asarray(llava["pixels"]), jnp.asarray(llava["mask"]))
  real = llava["mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], llava["out"].logits.numpy()[real],
                             atol=1e-4)


def test_captured_visual_attention_matches_hf(llava):
  layers = (2, 0)
  fwd = jax.jit(mllm.forward, static_argnums=(0, 5))
  _, inter = fwd(llava["cfg"], llava["params"], jnp.asarray(llava["ids"]),
                 jnp.asarray(llava["pixels"]), jnp.asarray(llava["mask"]), layers)
  got = np.asarray(inter["visual_attn"])
  assert got.shape == (2, 3, NV, NV) and got.dtype == np.float32
  assert np.isfinite(got).all()  # including the text-only row
  for k, layer in enumerate(layers):
    ref = llava["out"].attentions[layer].numpy().mean(axis=1)  # [B, L, L]
    for b in (0, 1):
      pos = np.flatnonzero(llava["ids"][b] == F.IMAGE_TOKEN)
      np.testing.assert_allclose(got[k, b], ref[b][np.ix_(pos, pos)], atol=1e-5)
  # Causal: visual token i never attends to a later visual token j > i.
  assert np.abs(np.triu(got[:, :2], k=1)).max() == 0.0


def test_full_attention_diagnostic_matches_hf(llava):
  cfg, params = llava["cfg"], llava["params"]
  ids, mask = jnp.asarray(llava["ids"]), jnp.asarray(llava["mask"])

  @jax.jit
  def run(params, ids, mask, pixels):
    pos, _ = mllm.visual_positions(ids, cfg.image_token_id, NV)
    image = mllm.post(cfg, params, mllm.adapt(cfg, params, mllm.encode_images(
        cfg, params, pixels)))
    embeds = mllm.embed(cfg, params, ids, image)
    return mllm.decode(cfg, params, embeds, mask, mllm.Capture((1,), full_attn=True),
                       visual_pos=pos)[1]
  inter = run(params, ids, mask, jnp.asarray(llava["pixels"]))
  got = np.asarray(inter["full_attn"][0])  # [B, H, L, L]
  ref = llava["out"].attentions[1].numpy()
  real = llava["mask"].astype(bool)
  for b in range(3):
    np.testing.assert_allclose(got[b][:, real[b]], ref[b][:, real[b]], atol=1e-5)


def test_visual_positions_from_ids():
  ids = jnp.array([[1, 7, 7, 2, 0], [7, 7, 3, 4, 5], [1, 2, 3, 4, 5]])
  pos, has = mllm.visual_positions(ids, 7, 2)
  np.testing.assert_array_equal(pos, [[1, 2], [0, 1], [0, 0]])
  np.testing.assert_array_equal(has, [True, True, False])


def test_bad_inputs_raise(llava):
  cfg, params = llava["cfg"], llava["params"]
  ids = llava["ids"].copy()
  ids[0, 2] = 5  # one image token fewer than Nv
  with pytest.raises(ValueError, match="Nv=15"):
    mllm.forward(cfg, params, jnp.asarray(ids), jnp.asarray(llava["pixels"]))
  with pytest.raises(ValueError, match="NHWC"):
    mllm.forward(cfg, params, jnp.asarray(llava["ids"]),
                 jnp.asarray(llava["pixels"]).transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match="qwen1.5-1.8b"):
    mllm.make_config("so400m-patch14-384", "qwen-1.8b", image_token_id=151646)
  with pytest.raises(ValueError, match="feature_select"):
    mllm.make_config("so400m-patch14-384", "qwen1.5-1.8b", image_token_id=1,
                     feature_select="cls")
  with pytest.raises(ValueError, match="visual_pos"):
    mllm.decode(cfg, params, jnp.zeros((1, 4, 32)), None, mllm.Capture((0,)))


def test_taf_student_init_and_shapes():
  cfg = mllm.make_config({"image_size": 16, "patch_size": 8, "hidden_size": 24,
                          "num_layers": 2, "num_heads": 2, "mlp_dim": 32},
                         {"vocab_size": 64, "hidden_size": 32, "num_layers": 2,
                          "num_heads": 4, "num_kv_heads": 4, "head_dim": 8,
                          "mlp_dim": 48}, image_token_id=63, post_connector_in=400)
  params = jax.jit(mllm.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  fc1 = np.asarray(params["adapter"]["fc1"]["kernel"])
  assert fc1.shape == (24, 400) and abs(fc1.std() - 0.02) < 0.002
  assert not np.asarray(params["adapter"]["fc2"]["bias"]).any()
  post = params["post"]
  assert post["kernel"].shape == (400, 32)
  bound = 1 / np.sqrt(400)  # PyTorch nn.Linear default: U(+-1/sqrt(fan_in))
  for x in (np.asarray(post["kernel"]), np.asarray(post["bias"])):
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.8 * bound
  assert abs(np.asarray(post["kernel"]).std() - bound / np.sqrt(3)) < 0.1 * bound
  ids = jnp.array([[1, 63, 63, 63, 2, 0]])
  logits, _ = jax.jit(mllm.forward, static_argnums=0)(cfg, params, ids,
                                                     jnp.ones((1, 16, 16, 3)))
  assert logits.shape == (1, 6, 64) and np.isfinite(np.asarray(logits)).all()


def test_connector_gelu_is_exact_erf():
  x = jnp.linspace(-3, 3, 7)[None, :, None] * jnp.ones((1, 1, 4))
  mod = adapter.Connector(features=4, depth=2)
  p = mod.init(jax.random.PRNGKey(0), x)["params"]
  h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  want = torch.nn.functional.gelu(torch.from_numpy(np.array(h))).numpy()
  want = want @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])
  np.testing.assert_allclose(mod.apply({"params": p}, x), want, atol=1e-6)


def test_greedy_generation_with_kv_cache_matches_hf(llava):
  cfg, params = llava["cfg"], llava["params"]
  model = F.load_llava(llava["path"])
  ids, mask, pixels = llava["ids"][:2], llava["mask"][:2], llava["pixels"][:2]
  steps = 4

  @jax.jit
  def prefill(params, ids, mask, pixels):
    pos, _ = mllm.visual_positions(ids, cfg.image_token_id, NV)
    image = mllm.post(cfg, params, mllm.adapt(cfg, params, mllm.encode_images(
        cfg, params, pixels)))
    cache = mllm.init_cache(cfg, ids.shape[0], ids.shape[1] + steps)
    hidden, inter = mllm.decode(cfg, params, mllm.embed(cfg, params, ids, image), mask,
                                cache=cache)
    return hidden, inter["cache"]

  @jax.jit
  def step(params, token, cache):
    hidden, inter = mllm.decode(cfg, params, mllm.embed(cfg, params, token, None),
                                jnp.ones(token.shape, jnp.int32), cache=cache)
    return hidden[:, -1] @ mllm.lm_head_kernel(cfg, params), inter["cache"]

  hidden, cache = prefill(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
  last = mask.sum(-1) - 1
  token = jnp.argmax(hidden[np.arange(2), last] @ mllm.lm_head_kernel(cfg, params), -1)
  generated = [np.asarray(token)]
  for _ in range(steps - 1):
    logits, cache = step(params, token[:, None], cache)
    token = jnp.argmax(logits, -1)
    generated.append(np.asarray(token))
  ours = np.stack(generated, 1)
  for b in range(2):
    n = int(mask[b].sum())
    with torch.no_grad():
      out = model.generate(input_ids=torch.from_numpy(ids[b:b + 1, :n]).long(),
                           pixel_values=torch.from_numpy(pixels[b:b + 1]).permute(0, 3, 1, 2),
                           max_new_tokens=steps, do_sample=False)
    np.testing.assert_array_equal(ours[b], out[0, n:].numpy())
