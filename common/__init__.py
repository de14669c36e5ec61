"""Shared foundation of the toolkit. Importing it tunes glibc's allocator once for the whole process (see below)."""

from common.malloc import keep_freed_memory

# PyTorch on CPU allocates a fresh activation buffer per layer; glibc serves every buffer above 32 MB with mmap and
# returns it on free, so each one is page-faulted in again (a fill of one 100 MB padded EfficientNet activation took
# 76 ms instead of ~5). Keeping freed memory in the heap doubled the backbone's CPU throughput here.
keep_freed_memory()
