//! Protocol versions: `major << 8 | minor` on the wire. The worker protocol has had
//! major 1 since Nix 0.x; only the minor moves. nixb speaks every minor from
//! [`Version::MIN`] (1.21, Nix 2.3) to [`Version::MAX`] (1.38, Nix 2.24+ and the
//! feature set); both sides use the smaller of the two versions exchanged.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
}

impl Version {
    pub const fn new(major: u8, minor: u8) -> Version {
        Version { major, minor }
    }

    /// The oldest client or daemon nixb talks to: Nix 2.3 speaks 1.21. (Nix 2.8 itself
    /// accepts 1.10; nothing older than 2.3 is in use, and the gates below 1.21 would be
    /// dead code.)
    pub const MIN: Version = Version::new(1, 21);
    /// Nix 2.24+: adds the feature-set exchange to the handshake.
    pub const MAX: Version = Version::new(1, 38);
    /// What Nix 2.8 speaks (`PROTOCOL_VERSION` in worker-protocol.hh@2.8.0).
    pub const NIX_2_8: Version = Version::new(1, 34);

    pub fn from_wire(n: u64) -> Version {
        Version {
            major: ((n >> 8) & 0xff) as u8,
            minor: (n & 0xff) as u8,
        }
    }

    pub fn to_wire(self) -> u64 {
        (self.major as u64) << 8 | self.minor as u64
    }

    /// `self >= 1.minor`, for gates written beside the field they gate.
    pub fn at_least(self, minor: u8) -> bool {
        self.major == 1 && self.minor >= minor || self.major > 1
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_major_shifted_by_eight() {
        // Nix 2.8: PROTOCOL_VERSION (1 << 8 | 34) = 0x122.
        assert_eq!(Version::NIX_2_8.to_wire(), 0x122);
        assert_eq!(Version::from_wire(0x126), Version::new(1, 38));
        assert_eq!(Version::new(1, 21).to_string(), "1.21");
        assert!(Version::new(1, 25).at_least(25));
        assert!(!Version::new(1, 24).at_least(25));
    }
}
