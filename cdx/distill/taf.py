"""TAF (teacher adapter fetch, docs/METHOD.md §2): the student sees images through the teacher's adapter.

A TAF student's param tree (docs/ARCHITECTURE.md) holds, besides its own `vision` and `llm`:
  adapter: the teacher's trained mlp2x_gelu adapter, frozen
           {"fc1": {"kernel" [Dv, Dt], "bias" [Dt]}, "fc2": {"kernel" [Dt, Dt], "bias" [Dt]}}
  post:    the trainable post-connector {"kernel" [Dt, Ds], "bias" [Ds]}, teacher hidden ->
           student hidden, initialised like a fresh torch.nn.Linear.
Since post is linear and follows the adapter's last Linear, the two fold into one Linear
[Dt, Ds] for export (`cdx.models.adapter.fold_post_connector`, used by cdx/hf.py): the trained
student becomes a plain mlp2x_gelu model whose intermediate width stays Dt (docs/EXPORT.md).
Which subtrees train is decided by the train config's path regexes, not here.
"""
from typing import Any

import jax
import jax.numpy as jnp

from cdx.models import adapter as adapter_lib

Params = dict[str, Any]


def init_post_connector(rng: jax.Array, teacher_hidden: int, student_hidden: int,
                        dtype: Any = jnp.float32) -> Params:
  """{"kernel" [Dt, Ds], "bias" [Ds]} with PyTorch nn.Linear's default init.

  torch uses kaiming_uniform(a=sqrt(5)) for the weight, i.e. U(+-1/sqrt(fan_in)), and
  U(+-1/sqrt(fan_in)) for the bias; fan_in = teacher_hidden.
  """
  for name, value in (("teacher_hidden", teacher_hidden), ("student_hidden", student_hidden)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int.")
  bound = 1.0 / teacher_hidden**0.5
  k_rng, b_rng = jax.random.split(rng)
  kernel = jax.random.uniform(k_rng, (teacher_hidden, student_hidden), jnp.float32,
                              -bound, bound)
  bias = jax.random.uniform(b_rng, (student_hidden,), jnp.float32, -bound, bound)
  return {"kernel": kernel.astype(dtype), "bias": bias.astype(dtype)}


def _student_hidden(student_params: Params) -> int:
  try:
    return int(student_params["llm"]["embed"]["embedding"].shape[1])
  except (KeyError, TypeError) as e:
    raise ValueError("student_params need llm/embed/embedding [V, D] to know the student "
                     "hidden size.") from e


def make_taf_student(student_params: Params, teacher_params: Params,
                     rng: jax.Array) -> Params:
  """A TAF student: student params with the teacher's adapter under `adapter` and a fresh
  post-connector under `post`. The inputs are not modified (new top-level dict; leaves shared).
  """
  if "adapter" not in teacher_params:
    raise ValueError("teacher_params have no 'adapter' subtree to fetch.")
  adapter = teacher_params["adapter"]
  teacher_out = int(adapter[adapter_lib.last_linear(adapter)]["kernel"].shape[1])
  student_adapter = student_params.get("adapter")
  if student_adapter is not None and "fc1" in student_adapter and "fc1" in adapter:
    s_in, t_in = student_adapter["fc1"]["kernel"].shape[0], adapter["fc1"]["kernel"].shape[0]
    if s_in != t_in:
      raise ValueError(f"teacher adapter takes {t_in}-d vision features but the student's "
                       f"takes {s_in}: TAF needs the shared vision tower.")
  hidden = _student_hidden(student_params)
  dtype = student_params["llm"]["embed"]["embedding"].dtype
  out = dict(student_params)
  out["adapter"] = adapter
  out["post"] = init_post_connector(rng, teacher_out, hidden, dtype)
  return out
