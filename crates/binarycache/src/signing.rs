//! Nix's signing keys and narinfo signatures (ed25519).
//!
//! ```text
//! secret key  = <name> ':' base64(64 bytes: 32-byte seed ++ 32-byte public key)
//! public key  = <name> ':' base64(32 bytes)
//! signature   = <name> ':' base64(64 bytes), over the fingerprint
//!               1;<store path>;sha256:<nar hash base32>;<nar size>;<ref path>,<ref path>,...
//! ```
//!
//! These are the files `nix key generate-secret` and `nix key convert-secret-to-public`
//! print, and the `Sig:` lines of narinfo files. A signature counts only when a trusted key
//! of the *same name* verifies it, as in Nix.

use std::collections::BTreeMap;
use std::path::Path;

use data_encoding::BASE64;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key '{key}' is not '<name>:<base64>'")]
    Syntax { key: String },
    #[error("key '{name}': {reason}")]
    Bad { name: String, reason: String },
    #[error("reading secret key file '{path}': {reason}")]
    File { path: String, reason: String },
}

fn split_key(s: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let s = s.trim();
    let (name, b64) = s.split_once(':').ok_or_else(|| KeyError::Syntax {
        // Never echo a secret key's material into an error message.
        key: s.split(':').next().unwrap_or("").chars().take(40).collect(),
    })?;
    if name.is_empty() {
        return Err(KeyError::Syntax { key: String::new() });
    }
    let bytes = BASE64.decode(b64.as_bytes()).map_err(|e| KeyError::Bad {
        name: name.to_string(),
        reason: format!("invalid base64: {e}"),
    })?;
    Ok((name, bytes))
}

/// A secret signing key (`nix key generate-secret`).
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.name)
    }
}

impl SecretKey {
    pub fn parse(s: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split_key(s)?;
        let bad = |reason: String| KeyError::Bad {
            name: name.to_string(),
            reason,
        };
        let arr: [u8; 64] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad(format!("secret key has {} bytes, expected 64", bytes.len())))?;
        // The second half must be the public key of the first: a mismatch means a
        // corrupted file, and signing with it would produce signatures nobody can verify.
        let key = SigningKey::from_keypair_bytes(&arr)
            .map_err(|_| bad("public half does not match the secret seed".into()))?;
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    /// Reads a `secret-key-files` entry.
    pub fn from_file(path: &Path) -> Result<SecretKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        SecretKey::parse(&text).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// A key from a 32-byte seed (for tests and key generation by the caller).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> SecretKey {
        SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(seed),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// `name:base64(signature)` over `fingerprint`, the form of a narinfo `Sig:` line.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(&sig.to_bytes()))
    }

    /// The secret key file's text (no newline, as Nix writes it).
    pub fn to_text(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.key.to_keypair_bytes())
        )
    }
}

/// A public key (`trusted-public-keys` entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split_key(s)?;
        let bad = |reason: String| KeyError::Bad {
            name: name.to_string(),
            reason,
        };
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad(format!("public key has {} bytes, expected 32", bytes.len())))?;
        let key =
            VerifyingKey::from_bytes(&arr).map_err(|_| bad("not a valid ed25519 point".into()))?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }

    /// Whether `sig` (`name:base64`) is this key's signature of `fingerprint`. A signature
    /// by a key of another name, or malformed, is simply not valid.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = BASE64.decode(b64.as_bytes()) else {
            return false;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
            return false;
        };
        // verify (not verify_strict) is what libsodium's crypto_sign_verify_detached,
        // which Nix uses, accepts.
        self.key.verify(fingerprint.as_bytes(), &sig).is_ok()
    }
}

/// The `trusted-public-keys` setting: keys by name.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, Vec<PublicKey>>,
}

impl TrustedKeys {
    pub fn new() -> TrustedKeys {
        TrustedKeys::default()
    }

    /// Parses a whitespace-separated `trusted-public-keys` value.
    pub fn parse_setting(value: &str) -> Result<TrustedKeys, KeyError> {
        let mut t = TrustedKeys::new();
        for k in value.split_whitespace() {
            t.add(PublicKey::parse(k)?);
        }
        Ok(t)
    }

    pub fn add(&mut self, key: PublicKey) {
        self.keys.entry(key.name.clone()).or_default().push(key);
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many of `sigs` a trusted key verifies over `fingerprint`.
    pub fn count_valid(&self, fingerprint: &str, sigs: &[String]) -> usize {
        sigs.iter()
            .filter(|sig| {
                let name = sig.split(':').next().unwrap_or("");
                self.keys
                    .get(name)
                    .is_some_and(|ks| ks.iter().any(|k| k.verify(fingerprint, sig)))
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Printed by real `nix key generate-secret --key-name test-1` and
    // `nix key convert-secret-to-public` (Nix 2.8).
    const SK: &str = "test-1:YFYphWb8Tt2eIoZeROa0Q17qUIIgxjQbvaLbHNTJpE3kYVy/XR/duX79bcacKTz+4Il/zWik+i6kE7ozH6/IMg==";
    const PK: &str = "test-1:5GFcv10f3bl+/W3GnCk8/uCJf81opPoupBO6Mx+vyDI=";
    // A fingerprint and the Sig: line real `nix copy` wrote for it with SK.
    const FP: &str = "1;/tmp/h/t/store/3ayawmkpnnmm8bhfng889z21ilxrsnlv-b;sha256:0ndnnv6sp5g4fik6qfgdhm7525r6764kbi484nivd414nb3viphj;952;/tmp/h/t/store/kd8pimc8vzy71bhwbibavli70zi4hzzf-a";
    const SIG: &str =
        "test-1:nW0XvVdrcGl872MT0glBgsLlXBoblxOi3Fg0syPx44ZCNoB8JsuRj0tnqNDJHdz6tR5KJSHGpJxb8Y2dB7I6CA==";

    #[test]
    fn keys_match_real_nix() {
        let sk = SecretKey::parse(SK).unwrap();
        assert_eq!(sk.to_public().to_text(), PK);
        assert_eq!(sk.to_text(), SK);
        // ed25519 is deterministic, so our signature must equal the one Nix wrote.
        assert_eq!(sk.sign(FP), SIG);
        let pk = PublicKey::parse(PK).unwrap();
        assert!(pk.verify(FP, SIG));
        assert!(!pk.verify(&FP.replace(";952;", ";953;"), SIG));
        assert!(!pk.verify(FP, &SIG.replace("test-1:", "test-2:")));
        assert!(!pk.verify(FP, "test-1:AAAA"));
    }

    #[test]
    fn trusted_keys_count_only_names_they_know() {
        let t = TrustedKeys::parse_setting(&format!("other:{} {PK}", &PK[7..])).unwrap();
        assert_eq!(t.count_valid(FP, &[SIG.to_string()]), 1);
        let t = TrustedKeys::parse_setting(&format!("other:{}", &PK[7..])).unwrap();
        assert_eq!(t.count_valid(FP, &[SIG.to_string()]), 0);
    }

    #[test]
    fn bad_keys_are_refused_without_leaking_material() {
        assert!(matches!(
            SecretKey::parse("nocolon"),
            Err(KeyError::Syntax { .. })
        ));
        let e = SecretKey::parse(PK).unwrap_err().to_string();
        assert_eq!(e, "key 'test-1': secret key has 32 bytes, expected 64");
        let mut bytes = BASE64.decode(&SK.as_bytes()[7..]).unwrap();
        bytes[40] ^= 1;
        let e = SecretKey::parse(&format!("test-1:{}", BASE64.encode(&bytes))).unwrap_err();
        assert!(e.to_string().contains("public half does not match"), "{e}");
        assert!(PublicKey::parse("k:!!!")
            .unwrap_err()
            .to_string()
            .contains("invalid base64"));
    }
}
