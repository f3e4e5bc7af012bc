//! ROCm (AMD GPUs): the plan. No type here pretends to work; none exists yet.
//!
//! A `RocmBackend` would implement [`MemoryBackend`](crate::MemoryBackend) through the HSA
//! runtime (`libhsa-runtime64.so.1`), loaded at run time like CUDA's driver:
//! - alloc/free: `hsa_amd_memory_pool_allocate` on the GPU agent's coarse-grained pool /
//!   `hsa_amd_memory_pool_free`; granularity from `HSA_AMD_MEMORY_POOL_INFO_RUNTIME_ALLOC_GRANULE`;
//! - identify: `hsa_amd_pointer_info` (type, agent, base, size; no buffer id, so ids would come
//!   from our own table plus the allocation's base and a generation);
//! - export: `hsa_amd_portable_export_dmabuf(ptr, size, &fd, &offset)`, closed with
//!   `hsa_amd_portable_close_dmabuf`; unsupported before ROCm 5.6 or without a kernel that
//!   exports amdgpu dma-bufs (report which);
//! - copies: `hsa_amd_memory_async_copy` with a completion signal;
//! - flush: not needed for coherent (fine-grained) pools; for coarse-grained memory a
//!   system-scope release fence before the NIC reads and after it writes;
//! - notices: the same [`NoticeHub`](crate::NoticeHub), fired from its free path.
//!
//! Tests would mirror `tests/cuda_backend.rs`, skipping where no AMD GPU is present.
