"""Triton kernels for dashinfer-core (import name `dashinfer_kernels`).

One kernel per module, each with a plain-torch reference function beside it (`*_ref`) that the tests
compare against: on the CPU under TRITON_INTERPRET=1 (set before importing these modules), on a GPU
natively. KV cache layout everywhere: [num_blocks, num_kv_heads, block_size, head_dim] per K and V.
"""
