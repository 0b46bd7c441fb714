"""How computation runs, whatever is computed:

  passes.py       batched forward passes; inputs kept at the first module a patch touches
  predcache.py    per-example predictions kept on disk across runs (a guard's baseline)
  distributed.py  torchrun: join the group, split batches, gather predictions, rank 0 writes
  oom.py          CUDA out-of-memory retries with half the batch
  allocator.py    glibc malloc thresholds (CPU forward passes were page-fault bound)
"""
