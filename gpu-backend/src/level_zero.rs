//! Level Zero (Intel GPUs): the plan. No type here pretends to work; none exists yet.
//!
//! A `LevelZeroBackend` would implement [`MemoryBackend`](crate::MemoryBackend) through
//! `libze_loader.so.1`, loaded at run time:
//! - alloc/free: `zeMemAllocDevice` / `zeMemFree` on a context and device;
//! - identify: `zeMemGetAllocProperties` (type, id — a real allocation id — device) and
//!   `zeMemGetAddressRange`;
//! - export: `zeMemGetAllocProperties` with a chained `ze_external_memory_export_fd_t`
//!   (`ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF`), given an allocation made with
//!   `ze_external_memory_export_desc_t`; say why not where the driver lacks the extension;
//! - copies: an immediate command list with `zeCommandListAppendMemoryCopy`;
//! - flush: a host-visible barrier where the device is not coherent with PCIe writes;
//! - notices: the same [`NoticeHub`](crate::NoticeHub), fired from its free path.
