"""sdmagic's own Stable Diffusion networks, in plain JAX over plain parameter pytrees.

The parameters keep the names and layouts of diffusers' and transformers' Flax ports (dense kernels
[in, out], convolution kernels HWIO, norms `scale`/`bias`), so Flax msgpack files load as they are
and PyTorch-layout safetensors convert with one rename-and-transpose plan. The arithmetic follows
PyTorch diffusers and transformers, the code the weights were trained with: exact GELU, PyTorch's
epsilons, attention scaled by 1/sqrt(head size).
"""
