"""Masked-key self-attention: many key masks per image in one pass (MCC's local views), and its packed ragged form."""

from .api import (
    compact_keys,
    masked_key_attention,
    masked_key_attention_reasons,
    segment_ids,
    varlen_attention,
    varlen_attention_reasons,
)
from .layer import (
    MaskedKeyAttention,
    attention_forward,
    block_forward,
    masked_self_attention,
    packed_self_attention,
    swap_attention,
)
from .reference import masked_key_attention_ref, varlen_attention_ref

__all__ = ["MaskedKeyAttention", "attention_forward", "block_forward", "compact_keys", "masked_key_attention",
           "masked_key_attention_reasons", "masked_key_attention_ref", "masked_self_attention", "packed_self_attention",
           "segment_ids", "swap_attention", "varlen_attention", "varlen_attention_reasons", "varlen_attention_ref"]
