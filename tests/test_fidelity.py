"""loss.fidelity=official: the official loss with every departure of docs/METHOD.md §8.

The attention term is checked against a straightforward transcription of the official
computation: full per-head attention maps of every layer, a fixed slice of Nv + 1
positions (the image tokens and the token after them) for every row, text-only rows
included, the sink filter and cosine in torch, divided by the batch size.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cdx.distill import losses
from cdx.distill import objective as objective_lib
from cdx.models import mllm
from tests import test_step as T

START = 5  # Every image row's image starts here, as 31 does in the official template.


def _batch(seed=0):
  """Rows with a common prefix of START tokens before the image; rows 3 and 6 text-only."""
  rng = np.random.default_rng(seed)
  ids = np.full((T.B, T.L), T.PAD, np.int32)
  labels = np.full((T.B, T.L), losses.IGNORE, np.int32)
  mask = np.zeros((T.B, T.L), np.int32)
  has_image = np.array([r[3] for r in T.ROWS])
  text = lambda n: rng.integers(4, T.STUDENT["vocab_size"], n)
  for b, (_, prompt, answer, image) in enumerate(T.ROWS):
    row = np.concatenate([text(START), np.full(T.NV if image else 0, T.IMG), text(prompt),
                          text(answer), [T.EOS]]).astype(np.int32)
    ids[b, :len(row)] = row
    mask[b, :len(row)] = 1
    labels[b, len(row) - answer - 1:len(row)] = row[len(row) - answer - 1:]
  pixels = rng.normal(size=(T.B, T.VISION["image_size"], T.VISION["image_size"], 3))
  pixels[~has_image] = 0.0
  return dict(input_ids=ids, attention_mask=mask, labels=labels,
              pixel_values=pixels.astype(np.float32), has_image=has_image)


def _full_maps(s, batch):
  """Per-head maps [layers, B, H, L, L] of both models (TAF: the student's adapter)."""
  student = T.params_lib.merge(s.trainable, s.frozen)
  feats = mllm.encode_images(s.student_cfg, student, batch["pixel_values"])
  adapted = mllm.adapt(s.student_cfg, student, feats)

  def maps(cfg, params, img):
    emb = mllm.embed(cfg, params, batch["input_ids"], img)
    layers = tuple(range(cfg.text.num_layers))
    _, inter = mllm.decode(cfg, params, emb, batch["attention_mask"],
                           mllm.Capture(layers, full_attn=True),
                           visual_pos=jnp.zeros((T.B, 2), jnp.int32))  # Unused summary.
    return np.asarray(inter["full_attn"], np.float64)

  return (maps(s.student_cfg, student, mllm.post(s.student_cfg, student, adapted)),
          maps(s.teacher_cfg, s.teacher, adapted))


def _official_attn(s_maps, t_maps, student_layers, teacher_groups, n):
  """The official attention loss, transcribed: fixed window [START, START + n), all rows."""
  window = slice(START, START + n)
  total = 0.0
  for sl, group in zip(student_layers, teacher_groups):
    sm = torch.tensor(s_maps[sl][:, :, window, window]).mean(1)  # [B, n, n]
    tm = torch.stack([torch.tensor(t_maps[l][:, :, window, window]).mean(1)
                      for l in group]).mean(0)
    thr_s = sm.mean(dim=(1, 2), keepdim=True) + sm.std(dim=(1, 2), keepdim=True)
    thr_t = tm.mean(dim=(1, 2), keepdim=True) + tm.std(dim=(1, 2), keepdim=True)
    keep = (sm <= thr_s) & (tm <= thr_t)
    fs, ft = sm * keep, tm * keep
    alive = (ft != 0).double()
    count = alive.sum(dim=1).clamp(min=1)
    sv, tv = (fs * alive).sum(dim=1) / count, (ft * alive).sum(dim=1) / count
    total += (1 - torch.nn.functional.cosine_similarity(sv, tv, dim=-1)).sum().item()
  return total / s_maps.shape[1]  # Divided by B: text-only rows count.


def _sharp(s):
  """The setup with peaked attention (q/k kernels scaled), so the loss is far from 0."""
  qk = lambda path: "/attn/q/" in f"/{path}/" or "/attn/k/" in f"/{path}/"
  scale = lambda f: lambda tree: jax.tree.map(
      lambda p, x: x * f if x is not None and qk(p) else x, T.params_lib.tree_paths(tree),
      tree)
  return dataclasses.replace(s, lora={}, frozen=scale(6.0)(s.frozen),
                             teacher=scale(4.0)(s.teacher))


def _loss(s, obj, batch):
  student = T.params_lib.merge(s.trainable, s.frozen)
  lora = mllm.Lora(s.lora, s.lora_spec.scale)
  return objective_lib.compute_loss(s.student_cfg, s.teacher_cfg, obj, student, s.teacher,
                                    batch, lora)[1]


@pytest.mark.slow
def test_official_attention_equals_the_transcription():
  s = _sharp(T.build_setup())
  batch = _batch()
  official = dataclasses.replace(s.objective, fidelity="official")
  got = _loss(s, official, batch)
  s_maps, t_maps = _full_maps(s, batch)
  want = _official_attn(s_maps, t_maps, official.student_layers, official.teacher_groups,
                        T.NV + 1)
  np.testing.assert_allclose(float(got["attn"]), want, rtol=2e-4)
  # The cdx loss (image rows only, Nv positions) is another number on this batch.
  cdx = _loss(s, s.objective, batch)
  assert want > 1e-2 and abs(float(cdx["attn"]) - want) > 0.01 * want


@pytest.mark.slow
def test_official_kd_is_the_unshifted_mask():
  s = T.build_setup()
  batch = _batch(1)
  official = _loss(s, dataclasses.replace(s.objective, fidelity="official"), batch)
  unshifted = _loss(s, dataclasses.replace(s.objective, kd_mask="official"), batch)
  shifted = _loss(s, s.objective, batch)
  np.testing.assert_allclose(official["kd"], unshifted["kd"], rtol=1e-6)
  assert not np.isclose(float(official["kd"]), float(shifted["kd"]))
  np.testing.assert_allclose(official["lm"], shifted["lm"], rtol=1e-6)  # LM unchanged.


def test_attention_positions_window_and_text_rows():
  ids = np.array([[9, 9, 3, 3, 3, 8, 0, 0],    # image at 2..4, next token 5
                  [9, 9, 9, 9, 8, 8, 0, 0],    # text only: the batch's window
                  [9, 3, 3, 3, 9, 9, 9, 9]])   # image at 1..3
  pos, rows = objective_lib.attention_positions(jnp.asarray(ids), 3, 3, "cdx")
  np.testing.assert_array_equal(rows, [True, False, True])
  pos, rows = objective_lib.attention_positions(jnp.asarray(ids), 3, 3, "official")
  np.testing.assert_array_equal(pos, [[2, 3, 4, 5], [2, 3, 4, 5], [1, 2, 3, 4]])
  assert np.asarray(rows).all()
  # No image at all: the official hard-coded start, clipped to the sequence.
  none = np.full((1, 40), 9)
  pos, _ = objective_lib.attention_positions(jnp.asarray(none), 3, 3, "official")
  np.testing.assert_array_equal(pos[0], [31, 32, 33, 34])
  pos, _ = objective_lib.attention_positions(jnp.asarray(none[:, :33]), 3, 3, "official")
  np.testing.assert_array_equal(pos[0], [31, 32, 32, 32])
  with pytest.raises(ValueError, match="fidelity"):
    objective_lib.attention_positions(jnp.asarray(ids), 3, 3, "exact")
