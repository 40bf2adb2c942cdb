"""Write a tiny random BERT (2 layers, width 32) and convert it: a text checkpoint whose width
matches tests/data/vit_tiny and clip_vision_tiny, for trying ``configs/pretrained.py`` end to
end on a CPU without downloading anything (docs/pretrained.md).  No torch needed::

    python tests/data/make_tiny_bert.py /tmp/bert_tiny   # HF folder /tmp/bert_tiny_hf
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vision_helpers  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    print("wrote", vision_helpers.write_tiny_bert(sys.argv[1], 32))
