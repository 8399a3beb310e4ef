"""Tiny random HF models (transformers + torch CPU) saved to temp dirs, for parity tests.

Every parameter gets extra random noise after HF's own init so that norms' scales and
biases (initialised to 1 / 0 by HF) are exercised by the mapping too.
"""
import torch
import transformers

IMAGE, PATCH = 32, 8  # 16 patches -> 15 visual tokens with "default" selection
NUM_VISUAL = (IMAGE // PATCH) ** 2 - 1
VOCAB = 128
IMAGE_TOKEN = 120
PAD = 0


def siglip_config(num_layers: int = 3, image: int = IMAGE) -> transformers.SiglipVisionConfig:
  return transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
      num_attention_heads=4, image_size=image, patch_size=PATCH, layer_norm_eps=1e-6)


def qwen2_config(gqa: bool = True, tie: bool = False,
                 hidden: int = 32) -> transformers.Qwen2Config:
  return transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
      max_position_embeddings=256, rope_theta=500.0, rms_norm_eps=1e-5,
      tie_word_embeddings=tie, use_sliding_window=False)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _build(cls, config, seed):
  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  return _randomize(cls(config), seed)


def save_siglip(path, seed: int = 0, image: int = IMAGE):
  model = _build(transformers.SiglipVisionModel, siglip_config(image=image), seed)
  model.save_pretrained(path)
  return model


def save_qwen2(path, gqa: bool = True, tie: bool = False, seed: int = 0):
  model = _build(transformers.Qwen2ForCausalLM, qwen2_config(gqa, tie), seed)
  if tie:  # noise broke the tie; restore it so the saved model is really tied
    model.tie_weights()
  model.save_pretrained(path)
  return model


def llava_config(gqa: bool = True, tie: bool = False,
                 hidden: int = 32) -> transformers.LlavaConfig:
  return transformers.LlavaConfig(
      vision_config=siglip_config(), text_config=qwen2_config(gqa, tie, hidden),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
      vision_feature_select_strategy="default", projector_hidden_act="gelu",
      image_seq_length=NUM_VISUAL, tie_word_embeddings=tie)


def save_llava(path, gqa: bool = True, tie: bool = False, seed: int = 0):
  model = _build(transformers.LlavaForConditionalGeneration, llava_config(gqa, tie), seed)
  if tie:
    model.tie_weights()
  model.save_pretrained(path)
  return model


def load_llava(path):
  return transformers.LlavaForConditionalGeneration.from_pretrained(
      path, attn_implementation="eager").eval()
