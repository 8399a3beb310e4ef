"""HF exports hold every weight the transformers model has: nothing is newly initialised on
load (SigLIP's unused post_layernorm is written as weight 1, bias 0), and the outputs of
the feature layer are exactly those of the source model."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import hf_fixtures as F
from cdx import hf
from cdx.models import mllm


def _load(cls, path, capfd, **kw):
  model, info = cls.from_pretrained(path, output_loading_info=True,
                                    attn_implementation="eager", **kw)
  printed = "".join(capfd.readouterr())
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert "MISSING" not in printed and "newly initialized" not in printed, printed
  return model.eval()


def _logits(model, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, 100, size=(1, F.NUM_VISUAL + 6))
  ids[0, 2:2 + F.NUM_VISUAL] = F.IMAGE_TOKEN
  pixels = rng.randn(1, 3, F.IMAGE, F.IMAGE).astype(np.float32)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(),
                 pixel_values=torch.from_numpy(pixels)).logits.numpy()


def test_llava_export_loads_without_new_weights_and_same_outputs(tmp_path, capfd):
  src = F.save_llava(str(tmp_path / "src"), gqa=True, seed=5)
  cfg, params = hf.load_llava(str(tmp_path / "src"))
  hf.save_llava(cfg, params, str(tmp_path / "out"))
  out = _load(transformers.LlavaForConditionalGeneration, str(tmp_path / "out"), capfd)
  np.testing.assert_allclose(_logits(out), _logits(src), atol=1e-5)
  saved = load_file(os.path.join(tmp_path, "out", "model.safetensors"))
  assert (saved["vision_tower.post_layernorm.weight"] == 1).all()
  assert (saved["vision_tower.post_layernorm.bias"] == 0).all()


def test_remote_code_export_loads_without_new_weights(tmp_path, capfd):
  cfg = mllm.make_config(  # a TAF student whose teacher is wider: the remote-code export
      {"image_size": F.IMAGE, "patch_size": F.PATCH, "hidden_size": 24, "num_layers": 3,
       "num_heads": 2, "mlp_dim": 40},
      {"vocab_size": F.VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
       "num_kv_heads": 2, "head_dim": 8, "mlp_dim": 48, "rope_theta": 10000.0},
      image_token_id=F.IMAGE_TOKEN, post_connector_in=48)
  params = jax.jit(mllm.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  hf.save_llava(cfg, params, str(tmp_path))
  _load(transformers.AutoModelForImageTextToText, str(tmp_path), capfd,
        trust_remote_code=True)


def test_siglip_export_loads_without_new_weights_and_same_features(tmp_path, capfd):
  src = F.save_siglip(str(tmp_path / "src"))
  cfg, params = hf.load_siglip(str(tmp_path / "src"), feature_layer=-1)
  hf.save_siglip(cfg, params, str(tmp_path / "out"))
  out = _load(transformers.SiglipVisionModel, str(tmp_path / "out"), capfd)
  pixels = torch.from_numpy(np.random.RandomState(1).randn(2, 3, F.IMAGE, F.IMAGE)
                            .astype(np.float32))
  with torch.no_grad():
    want = src(pixels, output_hidden_states=True).hidden_states[-1].numpy()
    got = out(pixels, output_hidden_states=True).hidden_states[-1].numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
