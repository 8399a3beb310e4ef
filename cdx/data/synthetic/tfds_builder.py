"""TFDS builder of the synthetic world's training data, stored as array_record.

Works without TensorFlow (tensorflow-datasets 4.9 alone): `GeneratorBasedBuilder` with
`file_format="array_record"` writes the shards and `builder.as_data_source()` reads them
back as random-access sources that grain can consume.

Splits: "pretrain" and "instruct" (the records of `text.pretrain_record` /
`text.instruct_record`). Features of one example:
  id            text     "pretrain-000012"
  image         uint8    [size, size, 3]   (all zeros for text-only samples)
  has_image     bool     []
  conversations text     JSON of the LLaVA conversation list
Decoded examples hold numpy arrays and `bytes` for text fields; `source[i]` is sample i.

  data_source = load(data_dir, num_train=1000, seed=0)   # builds on first call
  ex = data_source["instruct"][3]; json.loads(ex["conversations"])
"""
from __future__ import annotations

import dataclasses
import json

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from cdx.data.synthetic import text
from cdx.data.synthetic import world


@dataclasses.dataclass
class WorldConfig(tfds.core.BuilderConfig):
  num_train: int = 1000
  seed: int = 0
  size: int = 64
  antialias: int = 1
  text_only_frac: float = 0.05
  heldout_shift: int = 3
  format_frac: float = 0.3


def make_config(num_train: int, seed: int = 0, size: int = 64, antialias: int = 1,
                text_only_frac: float = 0.05, heldout_shift: int = 3,
                format_frac: float = 0.3) -> WorldConfig:
  """A config whose name encodes every field, so distinct worlds never share a folder."""
  name = (f"n{num_train}_seed{seed}_px{size}_aa{antialias}"
          f"_txt{int(round(text_only_frac * 1000))}_ho{heldout_shift}"
          f"_fmt{int(round(format_frac * 1000))}")
  return WorldConfig(name=name, num_train=num_train, seed=seed, size=size,
                     antialias=antialias, text_only_frac=text_only_frac,
                     heldout_shift=heldout_shift, format_frac=format_frac)


class SyntheticWorld(tfds.core.GeneratorBasedBuilder):
  """Pretrain captions and instruction chats about rendered synthetic scenes."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "2.0.0": "Larger objects; two-choice and yes/no instruct turns."}
  # TFDS finds this through importlib_resources, which tensorflow-datasets uses but does
  # not always install; the builder's own file is all it needs (for a checksums file).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.size
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
        "has_image": tfds.features.Tensor(shape=(), dtype=np.bool_),
        "conversations": tfds.features.Text(),
    })
    # DatasetInfo directly: dataset_info_from_configs looks for metadata files beside
    # the module, which this package does not ship.
    # disable_shuffling keeps examples in index order: source[i] is sample i.
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"pretrain": self._generate_examples("pretrain"),
            "instruct": self._generate_examples("instruct")}

  def _generate_examples(self, split: str, chunk: int = 512):
    cfg = self.builder_config
    pool = text.Pool.seen(world.heldout_combos(cfg.heldout_shift))
    for start in range(0, cfg.num_train, chunk):
      recs, scenes = [], []
      for i in range(start, min(start + chunk, cfg.num_train)):
        if split == "pretrain":
          rec, scene = text.pretrain_record(i, cfg.seed, pool)
        else:
          rec, scene = text.instruct_record(i, cfg.seed, pool, cfg.text_only_frac,
                                            cfg.format_frac)
        recs.append(rec)
        scenes.append(scene)
      drawn = [s for s in scenes if s is not None]
      images = iter(world.render(drawn, cfg.size, cfg.antialias)) if drawn else iter(())
      blank = np.zeros((cfg.size, cfg.size, 3), np.uint8)
      for rec, scene in zip(recs, scenes):
        yield rec["id"], {
            "id": rec["id"],
            "image": next(images) if scene is not None else blank,
            "has_image": scene is not None,
            "conversations": json.dumps(rec["conversations"]),
        }


def build(data_dir: str, num_train: int, seed: int = 0, **kwargs) -> SyntheticWorld:
  """Writes (once) and returns the builder; kwargs go to `make_config`."""
  builder = SyntheticWorld(data_dir=data_dir, config=make_config(num_train, seed, **kwargs),
                           file_format="array_record")
  builder.download_and_prepare()
  return builder


def load(data_dir: str, num_train: int, seed: int = 0, **kwargs) -> dict:
  """{"pretrain", "instruct"} -> random-access array_record sources (built if missing)."""
  return build(data_dir, num_train, seed, **kwargs).as_data_source()
