"""Masked-key self-attention: many key masks per image in one pass (MCC's local views), and its packed ragged form."""
