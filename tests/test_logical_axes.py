"""The models' logical-axis declarations shard exactly as the path table they replaced.

`_OLD_RULES` is the single table cdx/parallel.py held before each model file declared its
own axes (kept here, frozen, as the reference). For the tiny and the paper-sized models
(shapes only, jax.eval_shape), TAF student and teacher, unrolled and stacked (`scan_layers`),
with LoRA factors and under a train-state prefix, every leaf gets the same PartitionSpec on
several meshes.
"""
import jax
import pytest

from cdx import parallel
from cdx import paths
from cdx.models import mllm
from cdx.models import qwen
from cdx.train import lora as lora_lib
from configs import common

_ATTN_IN, _ATTN_OUT, _MLP_IN, _MLP_OUT = r"attn/(q|k|v)", r"attn/o", r"mlp/(gate|up)", r"mlp/down"
_OLD_RULES = (
    (rf".*/({_ATTN_IN}|{_MLP_IN}|mlp/fc1)/kernel/a", ("embed", "lora")),
    (rf".*/({_ATTN_IN})/kernel/b", ("lora", "heads")),
    (rf".*/({_MLP_IN}|mlp/fc1)/kernel/b", ("lora", "mlp")),
    (rf".*/({_ATTN_OUT})/kernel/a", ("heads", "lora")),
    (rf".*/({_MLP_OUT}|mlp/fc2)/kernel/a", ("mlp", "lora")),
    (rf".*/({_ATTN_OUT}|{_MLP_OUT}|mlp/fc2)/kernel/b", ("lora", "embed")),
    (r".*/kernel/a", ("embed", "lora")),
    (r".*/kernel/b", ("lora", "embed")),
    (rf".*/{_ATTN_IN}/kernel", ("embed", "heads")),
    (rf".*/{_ATTN_IN}/bias", ("heads",)),
    (rf".*/{_ATTN_OUT}/kernel", ("heads", "embed")),
    (rf".*/({_MLP_IN}|mlp/fc1)/kernel", ("embed", "mlp")),
    (r".*/mlp/fc1/bias", ("mlp",)),
    (rf".*/({_MLP_OUT}|mlp/fc2)/kernel", ("mlp", "embed")),
    (r"(.*/)?llm/embed/embedding", ("vocab", "embed")),
    (r"(.*/)?llm/lm_head/kernel", ("embed", "vocab")),
    (r"(.*/)?(adapter|post)(/.*)?/kernel", (None, "mlp")),
    (r"(.*/)?(adapter|post)(/.*)?/bias", ("mlp",)),
    (r".*", None),
)


def _old_specs(tree, mesh):
  def spec(kp, x):
    path = paths.path_str(kp)
    hit = paths.first_match(path, _OLD_RULES)
    logical = None if hit is None or hit[1] is None else tuple(hit[1])
    if logical is not None and paths.is_stacked(path):
      logical = ("layers",) + logical
    return parallel.logical_to_spec(path, x.shape, logical, mesh)
  return jax.tree_util.tree_map_with_path(spec, tree)


_MODELS = {  # name: (vision, text, post_connector_in): the presets' models.
    "tiny-teacher": (common.TINY_VISION, common.TINY_TEACHER, None),
    "tiny-student": (common.TINY_VISION, common.TINY_STUDENT,
                     common.TINY_TEACHER["hidden_size"]),
    "paper-teacher": (common.PAPER_VISION, common.PAPER_TEACHER, None),
    "paper-student": (common.PAPER_VISION, common.PAPER_STUDENT,
                      qwen.get_config(common.PAPER_TEACHER).hidden_size),
}
# Every layer linear of both stacks (vision fc1/fc2 included) and the paper's default.
_LORA_TARGETS = (r"(vision|llm)/layers(_\d+)?/(attn|mlp)/.*/kernel",)
_MESHES = ((2, 2, 2), (1, 4, 2), (1, 2, 4), (1, 8, 1), (1, 1, 8))


def _trees(name, scan):
  vision, text, post_in = _MODELS[name]
  cfg = mllm.make_config(vision, text, image_token_id=7, post_connector_in=post_in,
                         scan_layers=scan)
  params = jax.eval_shape(lambda: mllm.init_params(cfg, jax.random.key(0)))
  lora = jax.eval_shape(lambda p: lora_lib.init_lora(p, _LORA_TARGETS, 8, 16.0,
                                                     jax.random.key(1)), params)
  # As a train state holds them: params, LoRA factors and Adam moments of both.
  return {"params": params, "lora": lora, "opt": {"mu": (params, lora)}}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "stacked"])
@pytest.mark.parametrize("name", sorted(_MODELS))
def test_declared_axes_shard_like_the_old_table(name, scan):
  tree = _trees(name, scan)
  leaves = paths.leaf_paths(tree)
  assert any("/layers/" in p for p in leaves) == scan
  for shape in _MESHES:
    mesh = parallel.make_mesh(*shape)
    new = parallel.param_specs(tree, mesh, mllm.LOGICAL_AXES)
    old = _old_specs(tree, mesh)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    for path, a, b in zip(leaves, jax.tree.leaves(new, is_leaf=is_spec),
                          jax.tree.leaves(old, is_leaf=is_spec)):
      assert a == b, (shape, path, a, b)
  # Not trivially equal: the big kernels do shard.
  sharded = [s for s in jax.tree.leaves(new, is_leaf=is_spec) if any(s)]
  assert len(sharded) > len(leaves) // 3


def test_axis_map_from_config():
  tree = _trees("tiny-student", False)["params"]
  mesh = parallel.make_mesh(1, 4, 2)
  swapped = dict(parallel.DEFAULT_AXIS_MAP, embed="tensor", mlp="fsdp", heads="fsdp")
  specs = parallel.param_specs(tree, mesh, mllm.LOGICAL_AXES,
                               parallel.check_axis_map(swapped))
  up = specs["llm"]["layers_0"]["mlp"]["up"]["kernel"]
  assert up == jax.sharding.PartitionSpec("tensor", "fsdp")
  default = parallel.param_specs(tree, mesh, mllm.LOGICAL_AXES)
  assert default["llm"]["layers_0"]["mlp"]["up"]["kernel"] == (
      jax.sharding.PartitionSpec("fsdp", "tensor"))
  assert parallel.check_axis_map({"embed": "none", "mlp": "fsdp,tensor"}) == {
      "embed": None, "mlp": ("fsdp", "tensor")}
  with pytest.raises(ValueError, match=r"mesh.axis_map.embed='fdsp'"):
    parallel.check_axis_map({"embed": "fdsp"})
