"""Synthetic compositional world: procedurally rendered scenes with captions and Q&A.

  world.py         scenes (1-4 shapes with colour, size, position), relations, renderer
  grammar.py       caption meanings, their words and their truth in a scene
  contrast.py      true / minimally different false caption pairs, free of text shortcuts
  text.py          LLaVA training records, VQA / SugarCrepe / Winoground items, corpus()
  export.py        `python -m cdx.data.synthetic.export`: json + PNG in the LLaVA layout
  tfds_builder.py  the training splits as a TFDS array_record dataset (no TF needed)
"""
