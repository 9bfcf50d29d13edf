"""Tensor parallel on torch.distributed: the group and its collectives (parallel_state), the rank
processes rank 0 starts and sends each step to (launcher), and the loop they run (rank_worker)."""
