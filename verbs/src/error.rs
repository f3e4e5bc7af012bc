//! The crate's one error type.

use std::fmt;

/// What went wrong in a verbs or rdma_cm call, with enough to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shared library of rdma-core could not be loaded at run time.
    #[error("{library} not found: install rdma-core / ibverbs-providers ({reason})")]
    RdmaUnavailable {
        /// The soname that failed to load, e.g. `libibverbs.so.1`.
        library: &'static str,
        /// What the dynamic loader said.
        reason: String,
    },

    /// A verb failed and set an errno.
    #[error("{verb} failed: {errno}{}", hint_suffix(.hint))]
    Verb {
        /// The rdma-core function that failed, e.g. `ibv_reg_mr`.
        verb: &'static str,
        /// The errno it reported.
        errno: Errno,
        /// What to check, where we know.
        hint: Option<&'static str>,
    },

    /// No RDMA device of that name (or none at all).
    #[error("no RDMA device {name:?}; devices present: {present:?} (check `rdma link`, `ibv_devices`)")]
    NoSuchDevice {
        /// The name asked for.
        name: String,
        /// The names that do exist.
        present: Vec<String>,
    },

    /// The device refuses dma-buf memory regions.
    #[error("this device ({device}) does not support dma-buf MRs: ibv_reg_dmabuf_mr failed with {errno} (needs a kernel >= 5.12, rdma-core >= 34 and a provider that imports dma-bufs, e.g. mlx5; rxe and siw do not)")]
    DmaBufUnsupported {
        /// The device name.
        device: String,
        /// The errno that said so (EOPNOTSUPP or EPROTONOSUPPORT).
        errno: Errno,
    },

    /// The device lacks a capability the call needs.
    #[error("{device} does not support {what}")]
    Unsupported {
        /// The device name.
        device: String,
        /// The capability, in words.
        what: String,
    },

    /// A work request completed with an error status.
    #[error("work request {wr_id} on QP {qp_num} completed with {status} ({}), vendor error {vendor_err:#x}", .status.describe())]
    WorkCompletion {
        /// The status the NIC reported.
        status: WcStatus,
        /// The caller's id for the work request.
        wr_id: u64,
        /// The QP number the completion belongs to.
        qp_num: u32,
        /// The provider's vendor error code.
        vendor_err: u32,
    },

    /// A range falls outside the memory region or remote buffer it names.
    #[error("range {offset}..{end} is out of bounds of {what} of {len} bytes", end = .offset.saturating_add(*.length as u64))]
    OutOfBounds {
        /// What was indexed: "local MR", "remote buffer".
        what: &'static str,
        /// Start of the asked range.
        offset: u64,
        /// Length of the asked range.
        length: usize,
        /// The size of what was indexed.
        len: u64,
    },

    /// A bad argument, caught before any verb was called.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An rdma_cm event other than the one awaited, or an error event.
    #[error("rdma_cm: waited for {expected} but got {got} (status {status}){}", hint_suffix(.hint))]
    CmEvent {
        /// The event awaited.
        expected: &'static str,
        /// The event received (rdma_event_str).
        got: String,
        /// The event's status field (often a negative errno).
        status: i32,
        /// What to check.
        hint: Option<&'static str>,
    },

    /// The connection is lost; the cause names why. Its queue pair is in the error state.
    #[error("the connection is lost: {cause}")]
    ConnectionLost {
        /// Why.
        cause: crate::Fault,
    },

    /// A wait ran past its deadline.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
}

fn hint_suffix(hint: &Option<&'static str>) -> String {
    match hint {
        Some(h) => format!(" (hint: {h})"),
        None => String::new(),
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An errno value with its symbolic name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current errno.
    pub fn last() -> Self {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// The symbolic name, e.g. `EOPNOTSUPP`, where known.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::ENOSYS => "ENOSYS",
            libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::EADDRINUSE => "EADDRINUSE",
            libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
            libc::ENETUNREACH => "ENETUNREACH",
            libc::ECONNRESET => "ECONNRESET",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::EHOSTUNREACH => "EHOSTUNREACH",
            _ => "errno",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.name(), self.0, std::io::Error::from_raw_os_error(self.0))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

/// The status of a work completion (`enum ibv_wc_status`), named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WcStatus {
    /// IBV_WC_SUCCESS
    Success,
    /// IBV_WC_LOC_LEN_ERR
    LocalLength,
    /// IBV_WC_LOC_QP_OP_ERR
    LocalQpOperation,
    /// IBV_WC_LOC_EEC_OP_ERR
    LocalEecOperation,
    /// IBV_WC_LOC_PROT_ERR
    LocalProtection,
    /// IBV_WC_WR_FLUSH_ERR
    WrFlush,
    /// IBV_WC_MW_BIND_ERR
    MwBind,
    /// IBV_WC_BAD_RESP_ERR
    BadResponse,
    /// IBV_WC_LOC_ACCESS_ERR
    LocalAccess,
    /// IBV_WC_REM_INV_REQ_ERR
    RemoteInvalidRequest,
    /// IBV_WC_REM_ACCESS_ERR
    RemoteAccess,
    /// IBV_WC_REM_OP_ERR
    RemoteOperation,
    /// IBV_WC_RETRY_EXC_ERR
    RetryExceeded,
    /// IBV_WC_RNR_RETRY_EXC_ERR
    RnrRetryExceeded,
    /// IBV_WC_LOC_RDD_VIOL_ERR
    LocalRddViolation,
    /// IBV_WC_REM_INV_RD_REQ_ERR
    RemoteInvalidRdRequest,
    /// IBV_WC_REM_ABORT_ERR
    RemoteAbort,
    /// IBV_WC_INV_EECN_ERR
    InvalidEecn,
    /// IBV_WC_INV_EEC_STATE_ERR
    InvalidEecState,
    /// IBV_WC_FATAL_ERR
    Fatal,
    /// IBV_WC_RESP_TIMEOUT_ERR
    ResponseTimeout,
    /// IBV_WC_GENERAL_ERR
    General,
    /// IBV_WC_TM_ERR
    TagMatching,
    /// IBV_WC_TM_RNDV_INCOMPLETE
    TagMatchingRendezvousIncomplete,
    /// A value this crate does not know.
    Unknown(u32),
}

impl WcStatus {
    /// Maps the raw `ibv_wc_status` value.
    pub fn from_raw(v: u32) -> Self {
        use crate::sys::ibv_wc_status as s;
        use WcStatus::*;
        match v {
            s::IBV_WC_SUCCESS => Success,
            s::IBV_WC_LOC_LEN_ERR => LocalLength,
            s::IBV_WC_LOC_QP_OP_ERR => LocalQpOperation,
            s::IBV_WC_LOC_EEC_OP_ERR => LocalEecOperation,
            s::IBV_WC_LOC_PROT_ERR => LocalProtection,
            s::IBV_WC_WR_FLUSH_ERR => WrFlush,
            s::IBV_WC_MW_BIND_ERR => MwBind,
            s::IBV_WC_BAD_RESP_ERR => BadResponse,
            s::IBV_WC_LOC_ACCESS_ERR => LocalAccess,
            s::IBV_WC_REM_INV_REQ_ERR => RemoteInvalidRequest,
            s::IBV_WC_REM_ACCESS_ERR => RemoteAccess,
            s::IBV_WC_REM_OP_ERR => RemoteOperation,
            s::IBV_WC_RETRY_EXC_ERR => RetryExceeded,
            s::IBV_WC_RNR_RETRY_EXC_ERR => RnrRetryExceeded,
            s::IBV_WC_LOC_RDD_VIOL_ERR => LocalRddViolation,
            s::IBV_WC_REM_INV_RD_REQ_ERR => RemoteInvalidRdRequest,
            s::IBV_WC_REM_ABORT_ERR => RemoteAbort,
            s::IBV_WC_INV_EECN_ERR => InvalidEecn,
            s::IBV_WC_INV_EEC_STATE_ERR => InvalidEecState,
            s::IBV_WC_FATAL_ERR => Fatal,
            s::IBV_WC_RESP_TIMEOUT_ERR => ResponseTimeout,
            s::IBV_WC_GENERAL_ERR => General,
            s::IBV_WC_TM_ERR => TagMatching,
            s::IBV_WC_TM_RNDV_INCOMPLETE => TagMatchingRendezvousIncomplete,
            other => Unknown(other),
        }
    }

    /// The C name of the status, as rdma-core spells it.
    pub fn name(self) -> &'static str {
        use WcStatus::*;
        match self {
            Success => "IBV_WC_SUCCESS",
            LocalLength => "IBV_WC_LOC_LEN_ERR",
            LocalQpOperation => "IBV_WC_LOC_QP_OP_ERR",
            LocalEecOperation => "IBV_WC_LOC_EEC_OP_ERR",
            LocalProtection => "IBV_WC_LOC_PROT_ERR",
            WrFlush => "IBV_WC_WR_FLUSH_ERR",
            MwBind => "IBV_WC_MW_BIND_ERR",
            BadResponse => "IBV_WC_BAD_RESP_ERR",
            LocalAccess => "IBV_WC_LOC_ACCESS_ERR",
            RemoteInvalidRequest => "IBV_WC_REM_INV_REQ_ERR",
            RemoteAccess => "IBV_WC_REM_ACCESS_ERR",
            RemoteOperation => "IBV_WC_REM_OP_ERR",
            RetryExceeded => "IBV_WC_RETRY_EXC_ERR",
            RnrRetryExceeded => "IBV_WC_RNR_RETRY_EXC_ERR",
            LocalRddViolation => "IBV_WC_LOC_RDD_VIOL_ERR",
            RemoteInvalidRdRequest => "IBV_WC_REM_INV_RD_REQ_ERR",
            RemoteAbort => "IBV_WC_REM_ABORT_ERR",
            InvalidEecn => "IBV_WC_INV_EECN_ERR",
            InvalidEecState => "IBV_WC_INV_EEC_STATE_ERR",
            Fatal => "IBV_WC_FATAL_ERR",
            ResponseTimeout => "IBV_WC_RESP_TIMEOUT_ERR",
            General => "IBV_WC_GENERAL_ERR",
            TagMatching => "IBV_WC_TM_ERR",
            TagMatchingRendezvousIncomplete => "IBV_WC_TM_RNDV_INCOMPLETE",
            Unknown(_) => "IBV_WC_(unknown)",
        }
    }

    /// What the status means for the caller, in words.
    pub fn describe(self) -> &'static str {
        use WcStatus::*;
        match self {
            Success => "success",
            LocalLength => "local length error: the receive buffer is smaller than the message",
            LocalProtection => "local protection error: the local buffer is not covered by a valid MR with the needed access",
            LocalAccess => "local access error",
            WrFlush => "flushed: the QP went to the error state before this request ran",
            RemoteInvalidRequest => "the responder refused the request (e.g. no posted receive, or a message too long)",
            RemoteAccess => "remote access error: wrong rkey, range outside the remote MR, or the MR lacks the remote access asked for",
            RemoteOperation => "the responder could not complete the operation",
            RetryExceeded => "transport retry counter exceeded: the peer does not answer",
            RnrRetryExceeded => "receiver-not-ready retries exceeded: the peer posted no receive",
            _ => "see ibv_poll_cq(3)",
        }
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wc_status_round_trips_known_values_and_keeps_unknown_ones() {
        for v in 0..=23 {
            let s = WcStatus::from_raw(v);
            assert!(!matches!(s, WcStatus::Unknown(_)), "{v} should be known");
            assert!(s.name().starts_with("IBV_WC_"));
        }
        assert_eq!(WcStatus::from_raw(10), WcStatus::RemoteAccess);
        assert_eq!(WcStatus::from_raw(99), WcStatus::Unknown(99));
    }

    #[test]
    fn errors_name_the_verb_the_errno_and_the_hint() {
        let e = Error::Verb { verb: "ibv_reg_mr", errno: Errno(libc::ENOMEM), hint: Some("raise ulimit -l") };
        let s = e.to_string();
        assert!(s.contains("ibv_reg_mr"), "{s}");
        assert!(s.contains("ENOMEM"), "{s}");
        assert!(s.contains("ulimit -l"), "{s}");
        let u = Error::RdmaUnavailable { library: "libibverbs.so.1", reason: "x".into() };
        assert!(u.to_string().starts_with("libibverbs.so.1 not found: install rdma-core / ibverbs-providers"));
    }
}
