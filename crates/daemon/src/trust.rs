//! Who is on the other end of a connection, and what they may do: the peer's uid and gid
//! from `SO_PEERCRED`, matched against `trusted-users` and `allowed-users` as Nix matches
//! them (a user name, `@group` for the peer's primary group or a group listing the user
//! as a member, or `*`).

use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group, Uid, User};

/// The client's identity, as the kernel vouches for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Peer {
    /// `SO_PEERCRED` of a connected unix socket.
    pub fn of_socket(sock: &impl AsFd) -> std::io::Result<Peer> {
        let cred = getsockopt(sock, PeerCredentials).map_err(std::io::Error::from)?;
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: Some(cred.pid()),
        })
    }

    /// The user name Nix reports and matches (the uid in decimal when it has no entry).
    pub fn user_name(&self) -> String {
        match User::from_uid(Uid::from_raw(self.uid)) {
            Ok(Some(u)) => u.name,
            _ => self.uid.to_string(),
        }
    }

    fn group_name(&self) -> Option<String> {
        match Group::from_gid(Gid::from_raw(self.gid)) {
            Ok(Some(g)) => Some(g.name),
            _ => None,
        }
    }
}

/// `trusted-users` and `allowed-users`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustConfig {
    pub trusted_users: Vec<String>,
    pub allowed_users: Vec<String>,
}

impl Default for TrustConfig {
    /// Nix's defaults: only root is trusted, everyone may connect.
    fn default() -> TrustConfig {
        TrustConfig {
            trusted_users: vec!["root".into()],
            allowed_users: vec!["*".into()],
        }
    }
}

/// Whether a peer may connect, and whether it is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Trusted,
    Untrusted,
    Refused,
}

impl TrustConfig {
    /// Root is always trusted; everyone else as the two lists say. Root's connections
    /// look up no name: a lookup reads the user and group databases (`/etc/passwd`,
    /// `/etc/group`, or whatever NSS is configured with) on every connection.
    pub fn access(&self, peer: &Peer) -> Access {
        if peer.uid == 0 {
            return Access::Trusted;
        }
        let user = peer.user_name();
        let group = peer.group_name();
        if matches(&user, group.as_deref(), &self.trusted_users) {
            Access::Trusted
        } else if matches(&user, group.as_deref(), &self.allowed_users) {
            Access::Untrusted
        } else {
            Access::Refused
        }
    }
}

/// Nix's `matchUser`.
pub fn matches(user: &str, group: Option<&str>, list: &[String]) -> bool {
    list.iter().any(|entry| {
        if entry == "*" || entry == user {
            return true;
        }
        let Some(g) = entry.strip_prefix('@') else {
            return false;
        };
        if group == Some(g) {
            return true;
        }
        match Group::from_name(g) {
            Ok(Some(gr)) => gr.mem.iter().any(|m| m == user),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_groups_and_star_match_as_in_nix() {
        assert!(matches("alice", None, &list(&["bob", "alice"])));
        assert!(!matches("alice", None, &list(&["bob"])));
        assert!(matches("alice", None, &list(&["*"])));
        assert!(matches("alice", Some("wheel"), &list(&["@wheel"])));
        assert!(!matches(
            "alice",
            Some("users"),
            &list(&["@no-such-group-here"])
        ));
        assert!(!matches("alice", None, &list(&[])));
    }

    #[test]
    fn root_is_trusted_and_others_follow_the_lists() {
        let cfg = TrustConfig {
            trusted_users: vec![],
            allowed_users: list(&["4242"]),
        };
        let root = Peer {
            uid: 0,
            gid: 0,
            pid: None,
        };
        assert_eq!(cfg.access(&root), Access::Trusted);
        // A uid with no passwd entry is matched by its number, as Nix does.
        let nobody = Peer {
            uid: 4242,
            gid: 4242,
            pid: None,
        };
        assert_eq!(cfg.access(&nobody), Access::Untrusted);
        let other = Peer {
            uid: 4243,
            gid: 4243,
            pid: None,
        };
        assert_eq!(cfg.access(&other), Access::Refused);
        let star = TrustConfig {
            trusted_users: list(&["*"]),
            allowed_users: vec![],
        };
        assert_eq!(star.access(&other), Access::Trusted);
    }
}
