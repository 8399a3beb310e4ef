"""LLaVA whose projector's intermediate width is `projector_hidden_size` (transformers remote code).

cdx copies this file into HF export dirs of TAF students whose teacher hidden Ht exceeds
the student hidden Hs (docs/EXPORT.md); cdx itself never imports it. The projector is
Linear(vision -> Ht) -> GELU -> Linear(Ht -> Hs); stock LLaVA forces Ht == Hs.
Load with
  transformers.AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
Everything except the projector's two Linear shapes is `LlavaForConditionalGeneration`.
"""
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


class CdxLlavaConfig(LlavaConfig):
  # A plain class attribute on 5.x __init__-style configs, a dataclass field on later ones;
  # config.json always sets it.
  projector_hidden_size: int | None = None


class CdxLlavaMultiModalProjector(LlavaMultiModalProjector):
  """LLaVA's projector with linear_1 out = linear_2 in = projector_hidden_size."""

  def __init__(self, config):
    super().__init__(config)
    width = config.projector_hidden_size or config.text_config.hidden_size
    bias = config.multimodal_projector_bias
    self.linear_1 = nn.Linear(self.linear_1.in_features, width, bias=bias)
    self.linear_2 = nn.Linear(width, config.text_config.hidden_size, bias=bias)


class CdxLlavaForConditionalGeneration(LlavaForConditionalGeneration):
  config_class = CdxLlavaConfig

  def __init__(self, config):
    super().__init__(config)
    # Swapped before from_pretrained loads weights, so checkpoint shapes must match it.
    self.model.multi_modal_projector = CdxLlavaMultiModalProjector(config)
    self.post_init()
