"""fastwsss.kernels: fused Triton kernels and their exact PyTorch references.

Depends on torch (and triton) only; nothing here imports the rest of fastwsss, so the ops drop into any ViT.
"""
