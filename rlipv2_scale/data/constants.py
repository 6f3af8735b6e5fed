"""Data constants the `rlipv2` command line shows in its help.

They live here, free of numpy / PIL / streaming imports, so that building the parser stays light;
the modules that use them (`sources`, `shards`, `synthetic`) import them from here.
"""

FORMAT_NAMES = ("vg", "pseudo", "coco", "o365", "hico-det", "vcoco", "oi-sgg", "synthetic")  # sources.FORMATS
DEFAULT_SIZE_LIMIT = 1 << 26        # 64 MiB per MDS shard

# The synthetic world.
SPLITS = ("train", "val", "test")
BASE_SIZE = 128          # all sizes and thresholds of the world are in pixels at this image size
OBJECTS_PER_IMAGE = (2, 5)
