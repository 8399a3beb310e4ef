"""cdx: CompoDistill in JAX/Flax.

Layout follows the data flow: models -> distill -> train -> launch.
Submodules are imported explicitly (``import cdx.models.qwen``); nothing heavy is
imported here so that ``import cdx`` stays cheap.
"""

__version__ = "0.1.0"
