"""HF interop: LLaVA/Qwen2/SigLIP import variants (tied, sharded, older key spellings,
SiglipModel), strict key checking, and export that transformers loads back."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import hf_fixtures as F
from cdx import hf
from cdx.models import mllm, siglip

NV = F.NUM_VISUAL


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, 100, size=(2, NV + 8)).astype(np.int32)
  ids[0, 3:3 + NV] = F.IMAGE_TOKEN
  ids[1, 1:1 + NV] = F.IMAGE_TOKEN
  mask = np.ones_like(ids)
  mask[1, -3:] = 0
  pixels = rng.randn(2, F.IMAGE, F.IMAGE, 3).astype(np.float32)
  return ids, mask, pixels


def _hf_logits(model, ids, mask, pixels):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(),
                 attention_mask=torch.from_numpy(mask).long(),
                 pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits.numpy()


_forward = jax.jit(mllm.forward, static_argnums=0)
_init = jax.jit(mllm.init_params, static_argnums=0)


def _ours(cfg, params, ids, mask, pixels):
  logits, _ = _forward(cfg, params, jnp.asarray(ids), jnp.asarray(pixels),
                       jnp.asarray(mask))
  return np.asarray(logits)


def _check_logits(a, b, mask):
  real = mask.astype(bool)
  np.testing.assert_allclose(a[real], b[real], atol=1e-4)


@pytest.fixture(scope="module")
def tied_llava(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava_tied"))
  return path, F.save_llava(path, gqa=False, tie=True, seed=3)


def test_tied_llava_import_and_export_round_trip(tied_llava, tmp_path):
  path, model = tied_llava
  cfg, params = hf.load_llava(path)
  assert cfg.text.tie_embeddings and "lm_head" not in params["llm"]
  ids, mask, pixels = _inputs()
  ref = _hf_logits(model, ids, mask, pixels)
  _check_logits(_ours(cfg, params, ids, mask, pixels), ref, mask)
  out = str(tmp_path / "export")
  hf.save_llava(cfg, params, out)
  reloaded = F.load_llava(out)
  _check_logits(_hf_logits(reloaded, ids, mask, pixels), ref, mask)
  cfg2, params2 = hf.load_llava(out)  # and back into cdx: same arrays
  assert cfg2.text == cfg.text and cfg2.image_token_id == cfg.image_token_id
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(a, b)


def _tiny_cfg(post_in, vision_layers=3):
  return mllm.make_config(
      {"image_size": F.IMAGE, "patch_size": F.PATCH, "hidden_size": 24,
       "num_layers": vision_layers, "num_heads": 2, "mlp_dim": 40},
      {"vocab_size": F.VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
       "num_kv_heads": 2, "head_dim": 8, "mlp_dim": 48, "rope_theta": 10000.0},
      image_token_id=F.IMAGE_TOKEN, post_connector_in=post_in)


def test_taf_student_folds_into_plain_llava(tmp_path):
  cfg = _tiny_cfg(post_in=32)  # teacher hidden == student hidden here
  params = _init(cfg, jax.random.PRNGKey(1))
  ids, mask, pixels = _inputs(1)
  ours = _ours(cfg, params, ids, mask, pixels)
  hf.save_llava(cfg, params, str(tmp_path))
  reloaded = F.load_llava(str(tmp_path))
  _check_logits(_hf_logits(reloaded, ids, mask, pixels), ours, mask)
  # The export holds 2 of the 3 vision layers (feature layer -2), as HF feature layer -1.
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["vision_config"]["num_hidden_layers"] == 2
  assert saved["vision_feature_layer"] == -1


@pytest.mark.parametrize("post_in", [32, 48])
def test_fold_post_connector_is_exact(post_in):
  cfg = _tiny_cfg(post_in=post_in)
  params = _init(cfg, jax.random.PRNGKey(2))
  folded_cfg, folded = hf.fold_post_connector(cfg, params)
  assert folded_cfg.post_connector_in is None and "post" not in folded
  # The intermediate width stays the teacher's; None means "the text hidden" (32).
  assert folded_cfg.adapter_hidden == (None if post_in == 32 else post_in)
  assert folded["adapter"]["fc1"]["kernel"].shape == (24, post_in)
  assert folded["adapter"]["fc2"]["kernel"].shape == (post_in, 32)
  ids, mask, pixels = _inputs(2)
  np.testing.assert_allclose(_ours(folded_cfg, folded, ids, mask, pixels),
                             _ours(cfg, params, ids, mask, pixels), atol=1e-5)


def _tensors(path):
  return load_file(os.path.join(path, "model.safetensors"))


def test_taf_student_wider_teacher_exports_remote_code(tmp_path):
  cfg = _tiny_cfg(post_in=48)  # like 1152->2560->2560 + post 2560->2048
  params = _init(cfg, jax.random.PRNGKey(3))
  ids, mask, pixels = _inputs(3)
  ours = _ours(cfg, params, ids, mask, pixels)
  out = str(tmp_path / "wide")
  hf.save_llava(cfg, params, out)
  saved = json.load(open(os.path.join(out, "config.json")))
  assert saved["projector_hidden_size"] == 48
  assert set(saved["auto_map"]) == {"AutoConfig", "AutoModelForImageTextToText"}
  assert os.path.isfile(os.path.join(out, hf.REMOTE_CODE))
  model = transformers.AutoModelForImageTextToText.from_pretrained(
      out, trust_remote_code=True, attn_implementation="eager").eval()
  assert type(model).__name__ == "CdxLlavaForConditionalGeneration"
  assert model.model.multi_modal_projector.linear_1.out_features == 48
  _check_logits(_hf_logits(model, ids, mask, pixels), ours, mask)
  # Stock LLaVA would build a 32-wide projector: HF must refuse, not load garbage.
  with pytest.raises(Exception, match="mismatch"):
    transformers.LlavaForConditionalGeneration.from_pretrained(out)
  # Back into cdx: a plain model with a 48-wide adapter; same logits; re-export identical.
  cfg2, params2 = hf.load_llava(out)
  assert cfg2.adapter_hidden == 48 and cfg2.post_connector_in is None
  _check_logits(_ours(cfg2, params2, ids, mask, pixels), ours, mask)
  hf.save_llava(cfg2, params2, str(tmp_path / "again"))
  first, second = _tensors(out), _tensors(str(tmp_path / "again"))
  assert first.keys() == second.keys()
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])
  # transformers' own save_pretrained of the remote-code model reads back the same.
  model.save_pretrained(str(tmp_path / "resaved"))
  cfg3, params3 = hf.load_llava(str(tmp_path / "resaved"))
  assert cfg3.adapter_hidden == 48
  for a, b in zip(jax.tree_util.tree_leaves(params2), jax.tree_util.tree_leaves(params3)):
    np.testing.assert_array_equal(a, b)


def test_taf_student_narrower_teacher_pads_to_stock_llava(tmp_path):
  cfg = _tiny_cfg(post_in=16)  # teacher hidden < student hidden
  params = _init(cfg, jax.random.PRNGKey(4))
  ids, mask, pixels = _inputs(4)
  ours = _ours(cfg, params, ids, mask, pixels)
  out = str(tmp_path / "narrow")
  wide = _tiny_cfg(post_in=48)
  hf.save_llava(wide, _init(wide, jax.random.PRNGKey(0)), out)  # leaves the remote file...
  hf.save_llava(cfg, params, out)  # ...which a stock export to the same dir removes
  assert not os.path.exists(os.path.join(out, hf.REMOTE_CODE))
  saved = json.load(open(os.path.join(out, "config.json")))
  assert "auto_map" not in saved and "projector_hidden_size" not in saved
  assert saved["architectures"] == ["LlavaForConditionalGeneration"]
  proj = _tensors(out)
  w1 = proj["multi_modal_projector.linear_1.weight"]  # [out, in]: rows 16.. are padding
  assert w1.shape == (32, 24) and not w1[16:].any()
  assert not proj["multi_modal_projector.linear_1.bias"][16:].any()
  assert not proj["multi_modal_projector.linear_2.weight"][:, 16:].any()
  _check_logits(_hf_logits(F.load_llava(out), ids, mask, pixels), ours, mask)
  cfg2, params2 = hf.load_llava(out)
  assert cfg2.adapter_hidden is None
  _check_logits(_ours(cfg2, params2, ids, mask, pixels), ours, mask)


@pytest.fixture(scope="module")
def plain_llava(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava_plain"))
  F.save_llava(path, seed=5)
  return path


def _rewrite(src, dst, edit):
  os.makedirs(dst, exist_ok=True)
  tensors = edit(load_file(os.path.join(src, "model.safetensors")))
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f, \
       open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return dst


def test_missing_and_unexpected_keys_are_named(plain_llava, tmp_path):
  key = "language_model.model.layers.1.mlp.up_proj.weight"
  missing = _rewrite(plain_llava, str(tmp_path / "m"),
                     lambda t: {k: v for k, v in t.items() if k != key})
  with pytest.raises(ValueError, match=r"missing keys \[.*layers\.1\.mlp\.up_proj"):
    hf.load_llava(missing)
  extra = _rewrite(plain_llava, str(tmp_path / "u"),
                   lambda t: {**t, "language_model.model.surprise": np.zeros(2, np.float32)})
  with pytest.raises(ValueError, match="unexpected keys.*surprise"):
    hf.load_llava(extra)


def test_other_key_spellings_and_sharded_files_load_the_same(plain_llava, tmp_path):
  _, ref = hf.load_llava(plain_llava)

  def respell(t):  # the in-memory transformers-5 names + vision_model level of 4.x
    out = {}
    for k, v in t.items():
      k = k.replace("language_model.model.", "model.language_model.")
      k = k.replace("language_model.lm_head.", "lm_head.")
      k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
      out[k] = v
    return out
  _, params = hf.load_llava(_rewrite(plain_llava, str(tmp_path / "r"), respell))
  sharded = str(tmp_path / "s")
  F.load_llava(plain_llava).save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  _, params2 = hf.load_llava(sharded)
  for p in (params, params2):
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(p)):
      np.testing.assert_array_equal(a, b)


def test_qwen2_and_siglip_export_load_in_transformers(tmp_path):
  F.save_qwen2(str(tmp_path / "q"), gqa=True, tie=False)
  qcfg, qparams = hf.load_qwen2(str(tmp_path / "q"))
  hf.save_qwen2(qcfg, qparams, str(tmp_path / "q2"))
  a = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
  b = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "q2")).eval()
  ids = torch.arange(1, 11)[None]
  with torch.no_grad():
    np.testing.assert_allclose(a(ids).logits.numpy(), b(ids).logits.numpy(), atol=1e-5)
  F.save_siglip(str(tmp_path / "v"))
  vcfg, vparams = hf.load_siglip(str(tmp_path / "v"), feature_layer=-1)
  hf.save_siglip(vcfg, vparams, str(tmp_path / "v2"))
  _, again = hf.load_siglip(str(tmp_path / "v2"), feature_layer=-1)
  for x, y in zip(jax.tree_util.tree_leaves(vparams), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(x, y)


def test_siglip_model_dir_loads_vision_part(tmp_path):
  config = transformers.SiglipConfig(
      vision_config=F.siglip_config().to_dict(),
      text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=8))
  model = transformers.SiglipModel(config).eval()
  model.save_pretrained(str(tmp_path))
  cfg, params = hf.load_siglip(str(tmp_path))
  pixels = np.random.RandomState(0).randn(1, F.IMAGE, F.IMAGE, 3).astype(np.float32)
  with torch.no_grad():
    ref = model.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2),
                             output_hidden_states=True).hidden_states[-2].numpy()
  ours = siglip.Encoder(cfg).apply({"params": params}, pixels)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


def test_not_a_model_dir_raises(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    hf.load_llava(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"},
       "text_config": {"model_type": "qwen2"}}))
  with pytest.raises(ValueError, match="not SigLIP"):
    hf.load_llava(str(tmp_path))
