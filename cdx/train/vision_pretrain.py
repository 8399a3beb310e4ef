"""A pretrained vision tower for the synthetic world: the tiny SigLIP, trained once.

The paper's vision tower is a pretrained SigLIP, shared by teacher and student and frozen
in every stage (docs/METHOD.md §1). The tiny presets have no pretrained tower, and a random
frozen one says little about the objects (see `probe`). So, once per world and config, the
tiny encoder is trained as SigLIP was: a sigmoid loss over every (image, caption) pair of
a batch, +1 for matching pairs and -1 for the rest, logits = t * <img, txt> + b with
learned temperature t and bias b (Zhai et al., 2023, "Sigmoid Loss for Language Image
Pre-Training"). Images are training scenes of the world (seen pairs only, rendered on the
fly from their own sample stream, never an evaluation image); captions are whole-scene
descriptions (text.scene_caption). Three additions make a few hundred CPU steps enough
and keep what the MLLM must read:
  hard negatives  each image also gets its caption with one field edited to a false value
                  (a shape, a colour, a size or the relation, `hard_negative`) as an extra
                  negative: random in-batch captions differ mostly by colour, and with them
                  alone the probe below learned colour only (shape 0.35 -> 0.34).
  dense loss      `dense_weight` x cross-entropy of the shape, colour and size of the
                  object under each object patch from the patch's feature (`patch_labels`,
                  linear heads): a supervised, localized signal. Departure: the real tower
                  learned such features from billions of pairs; here they are taught.
  position loss   `position_weight` x cross-entropy of each patch's grid row and column
                  from its feature (linear heads, every patch). The other losses never need
                  where a patch is (the image embedding is a mean over patches), and without
                  this one the features drop it: an object's third of the image is read no
                  better than from the random tower, the relation of two objects at chance
                  (probe below), and no LLM on top learns "left of" from them. Real SigLIP
                  features keep position; this restores that.
Towers:
  image  siglip.Encoder up to the MLLM's feature layer [B, N, D] -> mean over patches ->
         LayerNorm -> Dense(embed)                       (what the MLLM reads: the encoder)
  text   word embeddings + positions [B, L, E] -> one pre-LN transformer block ->
         masked mean -> LayerNorm -> Dense(embed)        (discarded after training)
Only the encoder's params are returned, in the layout of the MLLM's "vision" subtree
(`mllm.init_params(cfg)["vision"]` with scan_layers=False: patch, pos_embedding,
layers_0.. up to the feature layer), as float32 numpy arrays.

  vision = pretrain_vision(world_seed, cfg.vision, out_dir, steps=1600, seed=0)
  before, after = probe(random_vision(cfg.vision), cfg.vision), probe(vision, cfg.vision)

Probe (`probe`: ridge classifiers on the mean feature of each object's patches, 1500
training / 500 held-out scenes; chance = commonest class 0.18 / 0.13 / 0.53), from
`python -m cdx.train.vision_pretrain --out DIR --vision '<TINY_VISION as JSON>'` with
the flags shown (before the position loss), on this project's shared 2-core box:
                                            shape  colour  size   train wall (user CPU)
  random tower                              0.354  0.946   0.633
  SigLIP loss only, 300 x 128               0.341  0.999   0.677
  + hard negatives, 300 x 128               0.358  0.998   0.655
  + dense loss (w 1, lr 5e-3), 300 x 128    0.426  1.000   0.891
  + dense w 2, 800 x 48                     0.592  1.000   0.904  338 s (110 s), loaded box
  + dense w 2, 1600 x 24                    0.718  1.000   0.915  141 s (112 s)
Smaller batches and more steps help shape most at equal cost. With the position loss
(w 1, the default), on the same probe plus where an object is and the relation of two
(chance 0.38 / 0.39 / 0.27):
                                 shape  colour  size   column  row    relation  train wall
  random tower                   0.354  0.946   0.633  0.402   0.382  0.272
  w 0, 6000 x 24                 0.974  1.000   0.959  0.410   0.426  0.263
  w 1, 800 x 24                  0.430  1.000   0.895  0.950   0.927  0.825     53 s
  w 1, 1600 x 24 (the defaults)  0.657  1.000   0.910  0.947   0.920  0.817     91 s
  w 1, 6000 x 24                 0.983  1.000   0.998  0.956   0.952  0.841    216 s
(`probe(pretrain_vision(0, TINY_VISION, None, steps=S, position_weight=w), TINY_VISION)`;
the 6000-step wall on an idle box, the others beside a training job). Position costs
shape at first and nothing at the 6,000 steps the miniature uses (launch/miniature.py
TOWER_STEPS).

Cache: out_dir/vision_<key>.msgpack (+ .json: the settings, the loss curve, the wall
time), key = hash of the world seed (or the samples), the vision config, the feature
layer, the object radii and every training setting; a later call with the same key loads
it instead of training (so teacher and student get the identical tower).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Sequence

import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdx.data import images as images_lib
from cdx.data.synthetic import contrast
from cdx.data.synthetic import grammar
from cdx.data.synthetic import text
from cdx.data.synthetic import world
from cdx.models import siglip

VERSION = 1  # bump when the recipe changes, so stale caches are not reused
MAX_WORDS = 32
PROBED = {"shape": world.SHAPES, "color": tuple(world.COLORS), "size": world.SIZES}
Sample = tuple  # (scene, caption) or (scene, caption, hard negative caption | None)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything besides the world and the architecture that changes the result."""
  steps: int = 1600
  batch_size: int = 24
  lr: float = 5e-3
  weight_decay: float = 1e-4
  warmup_steps: int = 20
  embed_dim: int = 64
  text_heads: int = 2
  hard_negatives: bool = True  # a minimally edited false caption per image (batch 2B)
  dense_weight: float = 2.0  # weight of the per-patch attribute loss (`patch_labels`)
  position_weight: float = 1.0  # weight of the per-patch grid row / column loss
  seed: int = 0


def vocabulary() -> list[str]:
  """Every word the world's captions use (from text.corpus), plus <pad> and <unk>."""
  words = {w for t in text.corpus() for w in _split(t)}
  return ["<pad>", "<unk>"] + sorted(words)


def _split(caption: str) -> list[str]:
  return caption.lower().replace(",", " ,").replace(".", " ").split()


def tokenize(captions: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
  """int32 [B, MAX_WORDS] word ids, 0-padded (truncated past MAX_WORDS)."""
  index = {w: i for i, w in enumerate(vocab)}
  out = np.zeros((len(captions), MAX_WORDS), np.int32)
  for b, c in enumerate(captions):
    ids = [index.get(w, 1) for w in _split(c)][:MAX_WORDS]
    out[b, :len(ids)] = ids
  return out


def pixels(scenes: Sequence[world.Scene], size: int) -> np.ndarray:
  """float32 [B, size, size, 3], normalized as the MLLM's images (cdx.data.images)."""
  x = world.render(scenes, size).astype(np.float32) / 255.0
  mean, std = np.asarray(images_lib.MEAN, np.float32), np.asarray(images_lib.STD, np.float32)
  return (x - mean) / std


# ---------------------------------------------------------------------------------------
# Towers.

class TextTower(nn.Module):
  """[B, L] word ids -> [B, embed] (one pre-LN transformer block, masked mean)."""
  vocab_size: int
  embed_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    mask = ids > 0
    x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(ids)
    x = x + self.param("pos", nn.initializers.normal(0.02), (ids.shape[1], self.embed_dim))
    attn_mask = mask[:, None, None, :] & mask[:, None, :, None]
    h = nn.LayerNorm(name="norm1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attn")(h, mask=attn_mask)
    h = nn.LayerNorm(name="norm2")(x)
    x = x + nn.Dense(self.embed_dim, name="fc2")(nn.gelu(nn.Dense(2 * self.embed_dim,
                                                                  name="fc1")(h)))
    w = mask[..., None].astype(x.dtype)
    x = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    return nn.Dense(self.embed_dim, name="proj")(nn.LayerNorm(name="norm_out")(x))


class PatchHeads(nn.Module):
  """Encoder features [B, N, D] -> logits of the shape, colour and size under each patch
  (one more class each for "no object"), then of the patch's grid row and column."""
  grid: int

  @nn.compact
  def __call__(self, feats: jax.Array) -> list[jax.Array]:
    return [nn.Dense(len(classes) + 1, name=f"{attr}")(feats)
            for attr, classes in PROBED.items()] + [
                nn.Dense(self.grid, name=f"{axis}")(feats) for axis in ("row", "column")]


def patch_labels(scenes: Sequence[world.Scene], cfg: siglip.SiglipConfig) -> np.ndarray:
  """int32 [B, N, 3]: (shape, colour, size) class of the object whose bounding circle
  holds each patch centre, len(classes) where none does (PROBED order)."""
  g = cfg.image_size // cfg.patch_size
  centres = (np.arange(g) + 0.5) / g
  out = np.empty((len(scenes), g, g, len(PROBED)), np.int32)
  out[:] = [len(c) for c in PROBED.values()]
  for b, s in enumerate(scenes):
    for o in s.objects:
      inside = np.hypot(centres[None, :] - o.x, centres[:, None] - o.y) <= world.RADIUS[o.size]
      out[b, inside] = [list(classes).index(getattr(o, attr))
                        for attr, classes in PROBED.items()]
  return out.reshape(len(scenes), g * g, len(PROBED))


class ImageHead(nn.Module):
  """Encoder features [B, N, D] -> [B, embed] (mean over patches)."""
  embed_dim: int

  @nn.compact
  def __call__(self, feats: jax.Array) -> jax.Array:
    return nn.Dense(self.embed_dim, name="proj")(nn.LayerNorm(name="norm")(feats.mean(1)))


def sigmoid_loss(img: jax.Array, txt: jax.Array, t: jax.Array, b: jax.Array,
                 valid: jax.Array | None = None) -> jax.Array:
  """SigLIP loss of [B, E] image and [C >= B, E] caption embeddings (L2-normalized here):
  mean over images of the summed -log sigmoid(label * logit) over the captions, label +1
  for caption i of image i, -1 for every other (captions past B are extra negatives;
  `valid` bool [C] masks absent ones)."""
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  logits = img @ txt.T * jnp.exp(t) + b
  labels = 2.0 * jnp.eye(img.shape[0], txt.shape[0]) - 1.0
  terms = -jax.nn.log_sigmoid(labels * logits)
  if valid is not None:
    terms = terms * valid[None, :]
  return terms.sum(-1).mean()


# ---------------------------------------------------------------------------------------
# Data.

def hard_negative(caption: grammar.Caption, scene: world.Scene, rng: np.random.Generator,
                  combos: Sequence[tuple[str, str]]) -> str | None:
  """A clearly false edit of one field of the caption: a shape, a colour, a size or the
  relation, each kind equally likely (a batch of random scenes rarely asks the towers to
  tell such captions apart; shapes least of all, as colours mostly tell scenes apart)."""
  nps = grammar.noun_phrases(caption)
  edits = {"shape": [], "color": [], "size": [], "rel": []}
  for t, np_ in enumerate(nps):
    edits["shape"] += [(t, dataclasses.replace(np_, shape=s))
                       for s in world.SHAPES if s != np_.shape]
    edits["color"] += [(t, dataclasses.replace(np_, color=c)) for c in world.COLORS
                       if np_.color and c != np_.color and (c, np_.shape) in combos]
    if np_.size:
      edits["size"].append((t, dataclasses.replace(np_, size=world.OPPOSITE[np_.size])))
  edits["rel"] = [(None, k) for k, item in enumerate(caption) if isinstance(item, grammar.Rel)]
  for kind in rng.permutation(list(edits)):
    options = edits[str(kind)]
    for i in rng.permutation(len(options)):
      t, new = options[int(i)]
      if kind == "rel":
        r = caption[new]
        neg = caption[:new] + (grammar.Rel(r.subj, world.OPPOSITE[r.rel], r.obj),) + \
            caption[new + 1:]
      else:
        neg = contrast.edit_nps(caption, lambda ps, t=t, new=new: ps[:t] + [new] + ps[t + 1:])
      if not grammar.is_true(neg, scene, lenient=True):
        return grammar.text(neg)
  return None


def world_samples(world_seed: int, start: int, count: int, pool: text.Pool | None = None,
                  ) -> list[Sample]:
  """(scene, whole-scene caption, hard negative caption or None) of samples
  start..start+count-1 of the seen world (their own stream: no MLLM record reuses it)."""
  pool = text.Pool.seen() if pool is None else pool
  out = []
  for i in range(start, start + count):
    rng = np.random.default_rng([world_seed, 31, i])
    scene = pool.scene(rng)
    caption = text.scene_caption(scene, rng)
    out.append((scene, grammar.text(caption),
                hard_negative(caption, scene, rng, pool.combos)))
  return out


def _batch(source, step: int, batch_size: int, rng: np.random.Generator) -> list[Sample]:
  if isinstance(source, int):  # a world seed: an endless stream of fresh scenes
    return world_samples(source, step * batch_size, batch_size)
  return [source[int(i)] for i in rng.integers(0, len(source), batch_size)]


# ---------------------------------------------------------------------------------------
# Training.

def cache_key(world_seed: Any, vision_cfg: siglip.SiglipConfig, feature_layer: int,
              settings: Settings) -> str:
  blob = json.dumps({"world": world_seed, "vision": dataclasses.asdict(vision_cfg),
                     "feature_layer": feature_layer, "settings": dataclasses.asdict(settings),
                     "radius": world.RADIUS, "version": VERSION}, sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _source_id(world_or_samples) -> Any:
  if isinstance(world_or_samples, int):
    return world_or_samples
  blob = json.dumps([[s[0].to_json(), *s[1:]] for s in world_or_samples], sort_keys=True)
  return "samples-" + hashlib.sha1(blob.encode()).hexdigest()[:16]


def pretrain_vision(world_or_samples, vision_cfg, out_dir: str | None, steps: int = 1600,
                    seed: int = 0, feature_layer: int = -2, log_every: int = 0,
                    **settings: Any) -> dict:
  """Trains (or loads from out_dir) the vision encoder; returns its params (numpy).

  Args:
    world_or_samples: a world seed (int: fresh seen-pool scenes with their pretrain
      captions, `world_samples`) or a list of (scene, caption) samples.
    vision_cfg: SiglipConfig, a VARIANTS name or a dict of fields (e.g. TINY_VISION).
    out_dir: cache folder (created); None = no cache.
    steps, seed: optimizer steps and the seed of the init and batch order.
    feature_layer: the MLLM's feature layer: the encoder is trained up to it and returned
      with exactly the layers the MLLM runs.
    settings: other `Settings` fields (batch_size, lr, ...).
  """
  vision_cfg = siglip.get_config(vision_cfg)
  cfg = Settings(steps=steps, seed=seed, **settings)
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  if not isinstance(world_or_samples, int) and not world_or_samples:
    raise ValueError("world_or_samples is an empty list; pass a world seed or samples.")
  key = cache_key(_source_id(world_or_samples), vision_cfg, feature_layer, cfg)
  path = os.path.join(out_dir, f"vision_{key}.msgpack") if out_dir else None
  encoder = siglip.Encoder(vision_cfg, feature_layer)
  size = vision_cfg.image_size
  template = encoder.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  if path and os.path.isfile(path):
    with open(path, "rb") as f:
      return serialization.from_bytes(jax.device_get(template), f.read())

  vocab = vocabulary()
  text_tower = TextTower(len(vocab), cfg.embed_dim, cfg.text_heads)
  head = ImageHead(cfg.embed_dim)
  grid = size // vision_cfg.patch_size
  dense = PatchHeads(grid)
  k_enc, k_head, k_txt = jax.random.split(jax.random.key(cfg.seed), 3)
  params = {
      "vision": encoder.init(k_enc, jnp.zeros((1, size, size, 3)))["params"],
      "head": head.init(k_head, jnp.zeros((1, 1, vision_cfg.hidden_size)))["params"],
      "dense": dense.init(k_head, jnp.zeros((1, 1, vision_cfg.hidden_size)))["params"],
      "text": text_tower.init(k_txt, jnp.zeros((1, MAX_WORDS), jnp.int32))["params"],
      "t": jnp.asarray(np.log(10.0), jnp.float32), "b": jnp.asarray(-10.0, jnp.float32),
  }
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, steps - 1),
                                                steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=cfg.weight_decay))
  opt_state = tx.init(params)

  def loss_fn(p, px, ids, labels):
    feats = encoder.apply({"params": p["vision"]}, px)
    img = head.apply({"params": p["head"]}, feats)
    txt = text_tower.apply({"params": p["text"]}, ids)
    loss = sigmoid_loss(img, txt, p["t"], p["b"], (ids > 0).any(-1))
    logits = dense.apply({"params": p["dense"]}, feats)
    if cfg.dense_weight:
      # Object patches only: background patches are most of the image and trivial.
      on = (labels[..., 0] < len(world.SHAPES)).astype(jnp.float32)
      ce = sum((optax.softmax_cross_entropy_with_integer_labels(z, labels[..., k]) * on).sum()
               for k, z in enumerate(logits[:len(PROBED)])) / jnp.maximum(on.sum(), 1.0)
      loss = loss + cfg.dense_weight * ce
    if cfg.position_weight:
      # Every patch: where it is, so that the features keep it for the relations.
      cells = jnp.arange(feats.shape[1])
      loss = loss + cfg.position_weight * sum(
          optax.softmax_cross_entropy_with_integer_labels(
              z, jnp.broadcast_to(c, z.shape[:-1])).mean()
          for z, c in zip(logits[len(PROBED):], (cells // grid, cells % grid)))
    return loss

  @jax.jit
  def step(p, opt_state, px, ids, labels):
    loss, grads = jax.value_and_grad(loss_fn)(p, px, ids, labels)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  rng = np.random.default_rng([cfg.seed, 17])
  losses, t0 = [], time.perf_counter()
  for i in range(steps):
    batch = _batch(world_or_samples, i, cfg.batch_size, rng)
    px = pixels([s[0] for s in batch], size)
    captions = [s[1] for s in batch]
    if cfg.hard_negatives:  # one more caption per image, "" (masked) when it has none
      captions += [(s[2] if len(s) > 2 else None) or "" for s in batch]
    ids = tokenize(captions, vocab)
    labels = patch_labels([s[0] for s in batch], vision_cfg)
    params, opt_state, loss = step(params, opt_state, px, ids, labels)
    if i % max(1, steps // 12) == 0 or i == steps - 1:
      losses.append((i, round(float(loss), 4)))
    if log_every and (i % log_every == 0 or i == steps - 1):
      print(f"vision pretrain step {i}: loss {float(loss):.4f}", flush=True)
  vision = jax.device_get(params["vision"])
  if path:
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      f.write(serialization.to_bytes(vision))
    os.replace(path + ".tmp", path)
    info = {"key": key, "world": _source_id(world_or_samples),
            "vision": dataclasses.asdict(vision_cfg), "feature_layer": feature_layer,
            "settings": dataclasses.asdict(cfg), "final_loss": float(loss),
            "losses": losses, "seconds": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(out_dir, f"vision_{key}.json"), "w") as f:
      json.dump(info, f, indent=1)
  return vision


def random_vision(vision_cfg, feature_layer: int = -2, seed: int = 0) -> dict:
  """A random encoder in the same layout (the baseline of `probe`)."""
  vision_cfg = siglip.get_config(vision_cfg)
  size = vision_cfg.image_size
  return jax.device_get(siglip.Encoder(vision_cfg, feature_layer).init(
      jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"])


# ---------------------------------------------------------------------------------------
# Linear probe.

def _patch_features(vision, vision_cfg, feature_layer, scenes) -> np.ndarray:
  """float64 [S, g, g, D]: the encoder's features of each scene's patches (g x g grid)."""
  encoder = siglip.Encoder(vision_cfg, feature_layer)
  g = vision_cfg.image_size // vision_cfg.patch_size
  apply = jax.jit(lambda px: encoder.apply({"params": vision}, px))
  return np.concatenate([
      np.asarray(apply(pixels(scenes[i:i + 256], vision_cfg.image_size)), np.float64)
      for i in range(0, len(scenes), 256)]).reshape(len(scenes), g, g, -1)


def _object_features(feats, vision_cfg, scenes) -> tuple[np.ndarray, list]:
  """Per object: the mean feature of the patches whose centre lies within its bounding
  circle (at least the patch under its centre) [M, D], and the objects."""
  size, p = vision_cfg.image_size, vision_cfg.patch_size
  g = size // p
  centres = (np.arange(g) + 0.5) * p / size  # patch centres, normalized
  out, objs = [], []
  for f, s in zip(feats, scenes):
    for o in s.objects:
      inside = np.hypot(centres[None, :] - o.x, centres[:, None] - o.y) <= world.RADIUS[o.size]
      row, col = world.pixel_of(o, size)
      inside[min(row // p, g - 1), min(col // p, g - 1)] = True
      out.append(f[inside].mean(0))
      objs.append(o)
  return np.stack(out), objs


def _ridge_accuracy(x_tr, y_tr, x_te, y_te, classes, lam: float = 1.0) -> float:
  mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
  a, b = (x_tr - mu) / sd, (x_te - mu) / sd
  a, b = np.c_[a, np.ones(len(a))], np.c_[b, np.ones(len(b))]
  onehot = (np.asarray(y_tr)[:, None] == np.asarray(classes)[None]).astype(np.float64)
  w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ onehot)
  pred = np.asarray(classes)[(b @ w).argmax(1)]
  return float((pred == np.asarray(y_te)).mean())


def probe(vision, vision_cfg, feature_layer: int = -2, seed: int = 1234,
          num_train: int = 1500, num_test: int = 500) -> dict:
  """Linear-probe accuracy of what the MLLM must read from an object's patches.

  Ridge-regression classifiers (one-hot targets, standardized features) fitted on the
  objects of num_train random scenes, scored on those of num_test other scenes (all
  (colour, shape) pairs, a stream no training uses): each object's shape, colour, size
  and the third of the image its centre lies in ("column", "row"), from the mean feature
  of its patches; and "relation", the relation of a scene's first object to its second
  (`world.primary_relation`) from their two features side by side (scenes with 2+
  objects); and "patch_shape", "patch_color", "patch_size", the class of the object under
  each single patch from that patch's feature (every patch inside an object's bounding
  circle): what an attention query can pick image tokens by. Returns {probe: accuracy,
  "chance": {probe: the test share of its most frequent class}}.
  """
  vision_cfg = siglip.get_config(vision_cfg)
  scenes = [world.sample_scene(np.random.default_rng([seed, 99, i]))
            for i in range(num_train + num_test)]
  feats = _patch_features(vision, vision_cfg, feature_layer, scenes)
  x, objs = _object_features(feats, vision_cfg, scenes)
  n_tr = sum(len(s.objects) for s in scenes[:num_train])
  thirds = (0, 1, 2)
  targets = {attr: ([getattr(o, attr) for o in objs], classes)
             for attr, classes in PROBED.items()}
  targets["column"] = ([min(int(o.x * 3), 2) for o in objs], thirds)
  targets["row"] = ([min(int(o.y * 3), 2) for o in objs], thirds)
  out, chance = {}, {}
  for name, (y, classes) in targets.items():
    out[name] = _ridge_accuracy(x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:], classes)
    chance[name] = max(y[n_tr:].count(c) for c in classes) / (len(y) - n_tr)
  first = np.cumsum([0] + [len(s.objects) for s in scenes])[:-1]
  pairs = np.asarray([i for i, s in enumerate(scenes) if len(s.objects) >= 2])
  xp = np.concatenate([x[first[pairs]], x[first[pairs] + 1]], 1)
  y = [world.primary_relation(*scenes[i].objects[:2]) for i in pairs]
  p_tr = int((pairs < num_train).sum())
  out["relation"] = _ridge_accuracy(xp[:p_tr], y[:p_tr], xp[p_tr:], y[p_tr:], world.RELATIONS)
  chance["relation"] = max(y[p_tr:].count(c) for c in world.RELATIONS) / (len(y) - p_tr)
  # Per patch: what an attention query over the image tokens can select by. Every patch
  # within an object's bounding circle, with that object's classes (`patch_labels`).
  labels = patch_labels(scenes, vision_cfg)
  xf = feats.reshape(len(scenes), -1, feats.shape[-1])
  for k, (attr, classes) in enumerate(PROBED.items()):
    y = labels[..., k]
    tr, te = (np.nonzero(y[part] < len(classes)) for part in (
        slice(None, num_train), slice(num_train, None)))
    y_tr, y_te = y[:num_train][tr], y[num_train:][te]
    out[f"patch_{attr}"] = _ridge_accuracy(xf[:num_train][tr], y_tr, xf[num_train:][te],
                                           y_te, range(len(classes)))
    chance[f"patch_{attr}"] = float(np.bincount(y_te).max() / len(y_te))
  return {**out, "chance": chance}


def main(argv: Sequence[str] | None = None) -> None:
  """Trains a tower and prints the probe before and after, e.g. the tiny presets' one:

  python -m cdx.train.vision_pretrain --out DIR --vision '{"image_size": 64,
    "patch_size": 8, "hidden_size": 64, "num_layers": 3, "num_heads": 4, "mlp_dim": 128}'
  """
  import argparse
  p = argparse.ArgumentParser(description=main.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--vision", required=True,
                 help="a SiglipConfig as JSON fields, or a siglip.VARIANTS name")
  p.add_argument("--steps", type=int, default=1600)
  p.add_argument("--world-seed", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=Settings.batch_size)
  p.add_argument("--dense-weight", type=float, default=Settings.dense_weight)
  p.add_argument("--position-weight", type=float, default=Settings.position_weight)
  p.add_argument("--lr", type=float, default=Settings.lr)
  a = p.parse_args(argv)
  vision_cfg = siglip.get_config(json.loads(a.vision) if a.vision.startswith("{")
                                 else a.vision)
  t0 = time.perf_counter()
  vision = pretrain_vision(a.world_seed, vision_cfg, a.out, a.steps, a.seed,
                           log_every=25, batch_size=a.batch_size,
                           dense_weight=a.dense_weight, position_weight=a.position_weight,
                           lr=a.lr)
  seconds = time.perf_counter() - t0
  before = probe(random_vision(vision_cfg, seed=a.seed), vision_cfg)
  after = probe(vision, vision_cfg)
  print(json.dumps({"seconds": round(seconds, 1), "before": before, "after": after}))


if __name__ == "__main__":
  main()
