//! The middle layer: every foreign call of the crate, each turned into `Result`.
//!
//! Each function here wraps exactly one foreign function (a verb of libibverbs, a call of
//! librdmacm, or one of libc's, for the descriptors and the loader), and nothing else: it
//! passes its arguments through and converts the return convention into [`Result`], naming
//! the call so that every error says which one failed. Functions whose call has preconditions
//! (live objects behind raw pointers, descriptors the caller owns) are `unsafe`, with a
//! `# Safety` section stating what the caller must uphold; the safe types (the crate's other
//! modules) call only these, never `sys` directly, and justify each call with a `// SAFETY:`
//! comment. The few calls without preconditions ([`device::get_device_list`],
//! [`mw::inc_rkey`], [`cm::event_str`], [`os::poll`], ...) are safe functions.
//!
//! rdma-core reports failure three ways: a null pointer with errno set (`ibv_alloc_pd`), `-1`
//! with errno set (`rdma_*`, `ibv_query_gid`), or the errno itself as a positive return
//! (`ibv_dereg_mr`, `ibv_modify_qp`, `ibv_post_send`, `ibv_advise_mr`). Each helper here names the
//! verb so that every error says which call failed: [`ptr`], [`neg_errno`], [`pos_errno`].
//!
//! The modules follow the objects: [`device`] (device lists, contexts, ports, GIDs, device
//! attributes, asynchronous events), [`pd`], [`mr`], [`mw`], [`cq`] (and completion
//! channels), [`qp`], [`srq`], [`cm`] (rdma_cm), and [`os`] (libc).

use std::ptr::NonNull;

use crate::error::{Errno, Error, Result};

pub(crate) mod cm;
pub(crate) mod cq;
pub(crate) mod device;
pub(crate) mod mr;
pub(crate) mod mw;
pub(crate) mod os;
pub(crate) mod pd;
pub(crate) mod qp;
pub(crate) mod srq;

/// The hint we know for an errno from a given verb.
fn hint(verb: &'static str, errno: i32) -> Option<&'static str> {
    match (verb, errno) {
        ("ibv_get_device_list", libc::ENOSYS) => Some(
            "this kernel has no RDMA support (no /sys/class/infiniband): load ib_uverbs and a device driver (e.g. rdma_rxe), or run under scripts/softroce",
        ),
        (v, libc::ENOMEM) | (v, libc::EAGAIN) if v.starts_with("ibv_reg") => {
            Some("pinned memory is limited by RLIMIT_MEMLOCK: raise `ulimit -l`, or use ODP")
        }
        (_, libc::EOPNOTSUPP) => Some("the device or its provider does not implement this"),
        (_, libc::EACCES) => Some("access flags exceed what the memory or device allows (REMOTE_WRITE needs LOCAL_WRITE)"),
        (_, libc::EADDRNOTAVAIL) | (_, libc::ENODEV) if verb.starts_with("rdma_") => {
            Some("no RDMA device has this IP address in this network namespace (check `rdma link` and `ip addr`)")
        }
        (_, libc::ENODEV) => Some("the RDMA device went away (check `rdma link`)"),
        (_, libc::ETIMEDOUT) if verb.starts_with("rdma_") => {
            Some("the peer did not answer: is a server listening there, and is its address routed through an RDMA device?")
        }
        (_, libc::ECONNREFUSED) => Some("nothing listens at that address and port, or the server rejected the request"),
        _ => None,
    }
}

/// The error for `verb` from an errno value.
pub fn verb_error(verb: &'static str, errno: i32) -> Error {
    Error::Verb { verb, errno: Errno(errno), hint: hint(verb, errno) }
}

/// For verbs that return a pointer and set errno on failure.
pub fn ptr<T>(verb: &'static str, p: *mut T) -> Result<NonNull<T>> {
    NonNull::new(p).ok_or_else(|| verb_error(verb, Errno::last().0))
}

/// For verbs that return `-1` (or any negative value) and set errno.
pub fn neg_errno(verb: &'static str, rc: i32) -> Result<()> {
    if rc < 0 {
        let e = Errno::last().0;
        // Some providers return -errno without setting errno.
        Err(verb_error(verb, if e != 0 { e } else { -rc }))
    } else {
        Ok(())
    }
}

/// The errno an error carries: a failed verb's ([`Error::Verb`]), else 0.
pub fn errno_of(e: &Error) -> Errno {
    match e {
        Error::Verb { errno, .. } => *errno,
        _ => Errno(0),
    }
}

/// For verbs that return `0` or a positive errno.
pub fn pos_errno(verb: &'static str, rc: i32) -> Result<()> {
    match rc {
        0 => Ok(()),
        // Some return -1 with errno set instead.
        rc if rc < 0 => Err(verb_error(verb, Errno::last().0)),
        rc => Err(verb_error(verb, rc)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conventions_map_to_named_errors() {
        assert!(pos_errno("ibv_dereg_mr", 0).is_ok());
        match pos_errno("ibv_post_send", libc::EINVAL) {
            Err(Error::Verb { verb, errno, .. }) => {
                assert_eq!(verb, "ibv_post_send");
                assert_eq!(errno, Errno(libc::EINVAL));
            }
            other => panic!("unexpected {other:?}"),
        }
        let null: *mut u8 = std::ptr::null_mut();
        assert!(matches!(ptr("ibv_alloc_pd", null), Err(Error::Verb { verb: "ibv_alloc_pd", .. })));
        match neg_errno("rdma_bind_addr", -libc::EADDRINUSE) {
            Err(Error::Verb { errno, .. }) => assert!(errno.0 != 0),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn registration_out_of_memory_points_at_memlock() {
        let e = verb_error("ibv_reg_mr", libc::ENOMEM).to_string();
        assert!(e.contains("ulimit -l"), "{e}");
    }
}
