//! Acting on the host as the guest caller of a request that creates an
//! entry (CREATE, MKDIR, MKNOD, SYMLINK), so the entry belongs to the
//! caller.
//!
//! The worker switches its effective uid and gid to the caller's for the
//! request (per thread: the raw `setresuid`/`setresgid` syscalls, not
//! libc's process-wide wrappers). Leaving uid 0 clears the thread's
//! effective capabilities, so the host kernel would then check the request
//! as a plain user with that uid. But the guest kernel has already checked
//! it (virtio-fs mounts with `default_permissions`), with the caller's
//! capabilities: a container process with CAP_DAC_OVERRIDE may create
//! files in a root-owned 0755 directory, as under runc. So, as virtiofsd
//! does, the thread raises CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and
//! CAP_FOWNER again while it acts for a non-root caller.
//!
//! This widens nothing the guest reaches on the host: the same requests'
//! names and inodes are confined to the share by the backend and
//! [`ShareFs`](super::backend::ShareFs) as before, and every other request
//! (write, unlink, rename, setattr, ...) already runs as root. The raised
//! capabilities are limited to what the thread has in its permitted set.
//!
//! [`CallerCreds`] undoes everything when dropped: the thread is root, with
//! the effective capabilities it had before, for the next request.

use std::io;

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities a non-root caller's request keeps on the host: those
/// the guest kernel has already checked for its own caller.
pub(crate) const CALLER_DAC_CAPS: [Capability; 3] = [Capability::CAP_DAC_OVERRIDE, Capability::CAP_DAC_READ_SEARCH, Capability::CAP_FOWNER];

fn caps_error(e: &caps::errors::CapsError) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, e.to_string())
}

/// `setresuid(-1, id, -1)` or `setresgid(-1, id, -1)` for this thread only.
fn set_effective(syscall: libc::c_long, id: u32) -> io::Result<()> {
    // SAFETY: setresuid/setresgid read no memory; -1 keeps a field as is.
    let rc = unsafe { libc::syscall(syscall, -1, libc::c_long::from(id), -1) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The worker thread acting as a guest caller; restores the thread on drop.
#[derive(Debug)]
#[must_use = "the thread acts as the caller only while the guard lives"]
pub(crate) struct CallerCreds {
    /// The thread's effective uid before, if it was switched.
    old_uid: Option<u32>,
    /// The thread's effective gid before, if it was switched.
    old_gid: Option<u32>,
    /// The thread's effective capabilities before, if they changed.
    old_effective: Option<CapsHashSet>,
}

impl CallerCreds {
    /// Switches this thread to `uid`/`gid` (nothing to do for root), with
    /// [`CALLER_DAC_CAPS`] effective when `uid` is not 0.
    pub(crate) fn switch(uid: u32, gid: u32) -> io::Result<Self> {
        let mut guard = Self { old_uid: None, old_gid: None, old_effective: None };
        // SAFETY: geteuid and getegid only read this thread's credentials.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if uid != euid || uid != 0 {
            // Saved before the uid switch clears it.
            guard.old_effective = Some(caps::read(None, CapSet::Effective).map_err(|e| caps_error(&e))?);
        }
        // The gid first: once the uid is not 0 the thread may not change it.
        if gid != egid {
            set_effective(libc::SYS_setresgid, gid)?;
            guard.old_gid = Some(egid);
        }
        if uid != euid {
            set_effective(libc::SYS_setresuid, uid)?;
            guard.old_uid = Some(euid);
        }
        if uid != 0 {
            // On error the guard's drop undoes the switch.
            raise_caller_caps().map_err(|e| caps_error(&e))?;
        }
        Ok(guard)
    }
}

/// Raises those of [`CALLER_DAC_CAPS`] the thread is permitted.
fn raise_caller_caps() -> Result<(), caps::errors::CapsError> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    let mut effective = caps::read(None, CapSet::Effective)?;
    effective.extend(CALLER_DAC_CAPS.iter().filter(|c| permitted.contains(c)));
    caps::set(None, CapSet::Effective, &effective)
}

impl Drop for CallerCreds {
    fn drop(&mut self) {
        // Back to root first: that alone makes every permitted capability
        // effective again; then exactly the set from before.
        if let Some(uid) = self.old_uid {
            if let Err(e) = set_effective(libc::SYS_setresuid, uid) {
                tracing::error!("virtio-fs: cannot switch the worker back to uid {uid}: {e}");
            }
        }
        if let Some(gid) = self.old_gid {
            if let Err(e) = set_effective(libc::SYS_setresgid, gid) {
                tracing::error!("virtio-fs: cannot switch the worker back to gid {gid}: {e}");
            }
        }
        if let Some(effective) = &self.old_effective {
            if let Err(e) = caps::set(None, CapSet::Effective, effective) {
                tracing::error!("virtio-fs: cannot restore the worker's capabilities: {e}");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    type Creds = (u32, u32, CapsHashSet, CapsHashSet);

    /// This thread's effective ids, effective and permitted capabilities.
    fn creds() -> Creds {
        // SAFETY: geteuid and getegid only read this thread's credentials.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        (uid, gid, caps::read(None, CapSet::Effective).unwrap(), caps::read(None, CapSet::Permitted).unwrap())
    }

    /// Runs `f` on a thread of its own: credentials are per thread, and a
    /// failed test must not leave the test harness's threads changed.
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn a_non_root_caller_keeps_only_the_dac_capabilities() {
        on_thread(|| {
            let before = creds();
            assert_eq!((before.0, before.1), (0, 0), "tests run as root");
            {
                let _g = CallerCreds::switch(1000, 1001).unwrap();
                let (uid, gid, effective, permitted) = creds();
                assert_eq!((uid, gid), (1000, 1001));
                let want: CapsHashSet = CALLER_DAC_CAPS.into_iter().collect();
                assert_eq!(effective, want, "exactly the DAC capabilities");
                assert_eq!(permitted, before.3, "permitted is untouched");
            }
            assert_eq!(creds(), before, "restored on drop");
        });
    }

    #[test]
    fn root_changes_nothing_and_a_group_alone_keeps_the_capabilities() {
        on_thread(|| {
            let before = creds();
            {
                let _g = CallerCreds::switch(0, 0).unwrap();
                assert_eq!(creds(), before);
            }
            {
                let g = CallerCreds::switch(0, 42).unwrap();
                assert!(g.old_uid.is_none() && g.old_effective.is_none());
                let (uid, gid, effective, _) = creds();
                assert_eq!((uid, gid), (0, 42));
                assert_eq!(effective, before.2, "uid 0 keeps every capability");
            }
            assert_eq!(creds(), before);
        });
    }

    #[test]
    fn only_permitted_capabilities_are_raised() {
        on_thread(|| {
            // Effective first: it must stay a subset of permitted.
            caps::drop(None, CapSet::Effective, Capability::CAP_DAC_OVERRIDE).unwrap();
            caps::drop(None, CapSet::Permitted, Capability::CAP_DAC_OVERRIDE).unwrap();
            let before = creds();
            assert!(!before.2.contains(&Capability::CAP_DAC_OVERRIDE));
            {
                let _g = CallerCreds::switch(1000, 1000).unwrap();
                let effective = creds().2;
                assert!(!effective.contains(&Capability::CAP_DAC_OVERRIDE));
                assert!(effective.contains(&Capability::CAP_DAC_READ_SEARCH));
                assert!(effective.contains(&Capability::CAP_FOWNER));
            }
            assert_eq!(creds(), before);
        });
    }

    #[test]
    fn a_narrowed_effective_set_is_restored_as_it_was() {
        on_thread(|| {
            // fuse-backend-rs lowers CAP_FSETID around some writes.
            caps::drop(None, CapSet::Effective, Capability::CAP_FSETID).unwrap();
            let before = creds();
            drop(CallerCreds::switch(1000, 1000).unwrap());
            assert_eq!(creds(), before, "CAP_FSETID stays lowered");
        });
    }

    #[test]
    fn a_failed_switch_leaves_the_thread_as_it_was() {
        on_thread(|| {
            let before = creds();
            {
                // Without CAP_SETUID the uid switch fails after the gid one.
                caps::drop(None, CapSet::Effective, Capability::CAP_SETUID).unwrap();
                let err = CallerCreds::switch(1000, 1000).unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
            }
            let mut after = creds();
            after.2.insert(Capability::CAP_SETUID);
            assert_eq!(after, before);
        });
    }
}
