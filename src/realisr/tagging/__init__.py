"""Image tagging with RAM (Recognize Anything) and SeeSR's DAPE: the tags OSEDiff and SeeSR use as their prompt,
and the image embeddings SeeSR uses as its soft prompt.

```python
from realisr.tagging import load_tagger
tagger = load_tagger("dape")          # or "ram"; files from $REALISR_WEIGHTS/ram/ or explicit paths
res = tagger(image)                   # PIL / numpy / torch [B,3,H,W] in [0,1]; official preprocessing
res.tags, res.text, res.image_embeds  # tag names per image, official tag strings, [B,145,512]
```

See ``docs/tagging.md``. Importing this package is light: torch is imported when a tagger is built.
"""

from __future__ import annotations

import importlib

__all__ = ["load_tagger", "Tagger", "TagResult", "official_prompt", "join_tags", "image_to_tensor",
           "ram_preprocess", "find_tagger_files", "tagger_status", "TaggerFiles", "IMAGENET_MEAN", "IMAGENET_STD",
           "RAM_IMAGE_SIZE"]

_WHERE = {"find_tagger_files": "loading", "tagger_status": "loading", "TaggerFiles": "loading"}


def __getattr__(name: str):
    if name in __all__:
        module = importlib.import_module(f".{_WHERE.get(name, 'tagger')}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
