//! Who is on the other end of the API's socket, and what they may do: the kernel's peer
//! credentials (`SO_PEERCRED`) of the connecting process, its groups as `/proc` shows them, and
//! the config's `[agent] admin-group` and `read-group`. Root may do everything.

use std::ffi::CString;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Nothing (403 for every request but none).
    Nobody,
    /// Read status, jobs, logs and events.
    Reader,
    /// Also start and cancel jobs.
    Admin,
}

/// A connecting process.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Its process id.
    pub pid: i32,
}

impl Peer {
    /// The groups of the peer: its group and, while the process lives, its supplementary ones.
    fn groups(&self) -> Vec<u32> {
        let mut groups = vec![self.gid];
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) {
            if let Some(line) = status.lines().find_map(|l| l.strip_prefix("Groups:")) {
                groups.extend(line.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
            }
        }
        groups
    }

    /// What the peer may do under `config`.
    pub fn role(&self, config: &sysstate_engine::config::AgentSection) -> Role {
        if self.uid == 0 {
            return Role::Admin;
        }
        let groups = self.groups();
        let member =
            |name: &Option<String>| name.as_deref().and_then(group_id).is_some_and(|gid| groups.contains(&gid));
        if member(&config.admin_group) {
            Role::Admin
        } else if member(&config.read_group) {
            Role::Reader
        } else {
            Role::Nobody
        }
    }

    /// `uid 1000 (alice), pid 4242`, for the records of what the peer asked.
    pub fn describe(&self) -> String {
        match user_name(self.uid) {
            Some(name) => format!("uid {} ({name}), pid {}", self.uid, self.pid),
            None => format!("uid {}, pid {}", self.uid, self.pid),
        }
    }
}

/// The id of the group `name`.
fn group_id(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer outlives the result, which is read
    // before it is dropped.
    let status = unsafe { libc::getgrnam_r(name.as_ptr(), &mut group, buffer.as_mut_ptr(), buffer.len(), &mut found) };
    (status == 0 && !found.is_null()).then_some(group.gr_gid)
}

/// The name of the user `uid`.
fn user_name(uid: u32) -> Option<String> {
    let mut user: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: as in `group_id`; the name is copied out before the buffer is dropped.
    let status = unsafe { libc::getpwuid_r(uid, &mut user, buffer.as_mut_ptr(), buffer.len(), &mut found) };
    if status != 0 || found.is_null() || user.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name points at a NUL-terminated string in `buffer`.
    Some(unsafe { std::ffi::CStr::from_ptr(user.pw_name) }.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_admin_and_others_need_a_configured_group() {
        let me = Peer { uid: 0, gid: 0, pid: std::process::id() as i32 };
        let config = sysstate_engine::config::AgentSection::default();
        assert_eq!(me.role(&config), Role::Admin);
        assert!(me.describe().starts_with("uid 0 (root), pid "), "{}", me.describe());
        // A made-up pid: its groups are only its own.
        let other = Peer { uid: 4242, gid: 0, pid: i32::MAX };
        assert_eq!(other.role(&config), Role::Nobody);
        let readers = sysstate_engine::config::AgentSection { read_group: Some("root".into()), ..Default::default() };
        assert_eq!(other.role(&readers), Role::Reader, "gid 0 is the group `root`");
        let admins = sysstate_engine::config::AgentSection { admin_group: Some("root".into()), ..Default::default() };
        assert_eq!(other.role(&admins), Role::Admin);
        let missing =
            sysstate_engine::config::AgentSection { admin_group: Some("no-such-group".into()), ..Default::default() };
        assert_eq!(other.role(&missing), Role::Nobody);
    }
}
