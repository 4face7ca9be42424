"""What the ops' weight caches (the attention block's folded weights, the convolutions' packed weights) key on."""
from __future__ import annotations

import torch


def weights_key(*tensors: torch.Tensor) -> tuple:
    """Storage, version counter, dtype and device of each tensor: an in-place change (an optimizer step, a load)
    bumps the version, a .to() makes a new storage. Inference tensors have no version counter (None here): a change
    to them in place, which only inference mode allows, is not seen."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device) for t in tensors)
