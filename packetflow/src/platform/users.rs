//! Users: looking one up, and becoming one (dropping every privilege).

use anyhow::Result;

use super::privileges::effective_caps;
use crate::error::user;

/// (uid, gid) of user `name`, from the passwd database.
pub fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let c = std::ffi::CString::new(name).map_err(|_| user(format!("bad user name '{name}'")))?;
    // SAFETY: a plain C struct of integers and arrays: all-zero bytes are a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: `c` is NUL-terminated; `pw`, `buf` (with its length) and `out` are ours and outlive
    // the call.
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &raw mut pw, buf.as_mut_ptr(), buf.len(), &raw mut out) };
    if r != 0 || out.is_null() {
        crate::user_bail!("unknown user '{name}' (--user needs an existing account, e.g. nobody)");
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

/// Becomes `uid`/`gid` with no supplementary groups and no capabilities. Every thread
/// follows (glibc applies set*id process-wide). Already-open fds (programs, links, maps,
/// rings, sockets) keep working: the kernel checked privileges when they were opened.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    let fail = |what: &str| Err(anyhow::anyhow!("dropping privileges: {what}: {}", std::io::Error::last_os_error()));
    // SAFETY: setgroups(2) with an empty list reads nothing.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return fail("setgroups");
    }
    // SAFETY: no memory preconditions: plain integer arguments.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return fail("setresgid");
    }
    // SAFETY: no memory preconditions: plain integer arguments.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return fail("setresuid");
    }
    // Without PR_SET_KEEPCAPS, leaving uid 0 clears every capability set; check it.
    if uid != 0 && effective_caps() != 0 {
        return fail("capabilities survived setresuid");
    }
    Ok(())
}
