"""What the Triton kernels take, for the modules that check their inputs before launching and for callers above ops
that refuse early (the cache). Imports nothing: it must be readable where Triton is not installed."""

# The widest head_dim (of keys, or of values) the Triton kernels take: their tiles are padded to a power of two, and
# one of 1024 channels would not fit a program's registers (the attention kernel's tiles shrink past 256 channels to
# stay within what head_dim 256 holds: `attention_kernel._TILE_CHANNEL_TOKENS`). The plain-PyTorch reference takes any
# head_dim; the cache refuses wider heads only on CUDA devices, where the kernels run.
MAX_KERNEL_HEAD_DIM = 512
