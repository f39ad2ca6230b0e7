//! Where the key-encryption key (KEK) comes from: a passphrase stretched with argon2id,
//! or a 32-byte key file. Each can be read from a file, an environment variable or an
//! interactive prompt.

use std::path::Path;

use secrecy::{ExposeSecret, SecretBox, SecretString};
use zeroize::{Zeroize, Zeroizing};

use crate::Error;
use crate::fsutil;

/// Length of the KEK and of a key file's contents.
pub const KEK_LEN: usize = 32;

/// The unseal secret an operator supplies for a store.
pub enum UnsealKey {
    /// A passphrase; the KEK is derived from it with argon2id and the store's salt.
    Passphrase(SecretString),
    /// 32 random bytes used directly as the KEK.
    KeyFile(SecretBox<[u8; KEK_LEN]>),
}

impl std::fmt::Debug for UnsealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Passphrase(_) => f.write_str("UnsealKey::Passphrase([redacted])"),
            Self::KeyFile(_) => f.write_str("UnsealKey::KeyFile([redacted])"),
        }
    }
}

impl UnsealKey {
    /// Which kind of secret this is, as recorded in the store.
    pub fn kind(&self) -> UnsealKind {
        match self {
            Self::Passphrase(_) => UnsealKind::Passphrase,
            Self::KeyFile(_) => UnsealKind::KeyFile,
        }
    }

    /// A passphrase given in memory (for example by the operator CLI).
    pub fn passphrase(passphrase: SecretString) -> Result<Self, Error> {
        if passphrase.expose_secret().is_empty() {
            return Err(Error::EmptyPassphrase);
        }
        Ok(Self::Passphrase(passphrase))
    }

    /// Reads a passphrase from a file (mode 0600), dropping one trailing newline.
    pub fn passphrase_from_file(path: &Path) -> Result<Self, Error> {
        fsutil::check_private(path)?;
        let raw = Zeroizing::new(std::fs::read(path).map_err(|source| Error::io(path, source))?);
        let text = std::str::from_utf8(&raw).map_err(|_| Error::PassphraseNotUtf8)?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        Self::passphrase(SecretString::from(text.to_owned()))
    }

    /// Reads a passphrase from environment variable `var`.
    pub fn passphrase_from_env(var: &str) -> Result<Self, Error> {
        let value = std::env::var(var).map_err(|_| Error::EnvVarMissing(var.to_owned()))?;
        Self::passphrase(SecretString::from(value))
    }

    /// Asks for the passphrase on the terminal, without echo.
    pub fn passphrase_from_prompt(prompt: &str) -> Result<Self, Error> {
        let value = rpassword::prompt_password(prompt).map_err(Error::Prompt)?;
        Self::passphrase(SecretString::from(value))
    }

    /// Reads a key file: exactly 32 raw bytes, or 64 hex characters and an optional
    /// newline. The file must not be readable by group or others.
    pub fn key_file(path: &Path) -> Result<Self, Error> {
        fsutil::check_private(path)?;
        let raw = Zeroizing::new(std::fs::read(path).map_err(|source| Error::io(path, source))?);
        Self::key_from_bytes(&raw).map_err(|problem| Error::KeyFile {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// Reads a 32-byte key, hex-encoded, from environment variable `var`.
    pub fn key_from_env(var: &str) -> Result<Self, Error> {
        let value = Zeroizing::new(std::env::var(var).map_err(|_| Error::EnvVarMissing(var.to_owned()))?);
        Self::key_from_bytes(value.as_bytes()).map_err(|problem| Error::KeyEnv {
            var: var.to_owned(),
            problem,
        })
    }

    /// Creates a new key file with 32 random bytes, mode 0600. Fails if it exists.
    pub fn generate_key_file(path: &Path) -> Result<Self, Error> {
        let rng = ring::rand::SystemRandom::new();
        let mut failed = false;
        let key = SecretBox::init_with_mut(|bytes: &mut [u8; KEK_LEN]| {
            failed = ring::rand::SecureRandom::fill(&rng, bytes).is_err();
        });
        if failed {
            return Err(Error::Randomness);
        }
        fsutil::write_private_new(path, key.expose_secret())?;
        Ok(Self::KeyFile(key))
    }

    fn key_from_bytes(raw: &[u8]) -> Result<Self, &'static str> {
        let mut failed: Option<&'static str> = None;
        let key = SecretBox::init_with_mut(|bytes: &mut [u8; KEK_LEN]| {
            if raw.len() == KEK_LEN {
                bytes.copy_from_slice(raw);
                return;
            }
            let text = raw.strip_suffix(b"\n").unwrap_or(raw);
            if text.len() != 2 * KEK_LEN {
                failed = Some("expected exactly 32 bytes, or 64 hex characters");
            } else if hex::decode_to_slice(text, bytes).is_err() {
                bytes.zeroize();
                failed = Some("64 characters, but not all of them hex digits");
            }
        });
        match failed {
            Some(problem) => Err(problem),
            None => Ok(Self::KeyFile(key)),
        }
    }
}

/// The kind of unseal secret a store was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsealKind {
    /// argon2id over a passphrase.
    Passphrase,
    /// A 32-byte key file.
    KeyFile,
}

impl UnsealKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Passphrase => "passphrase",
            Self::KeyFile => "keyfile",
        }
    }

    /// The bare noun, for sentences that supply their own article ("wrong key file").
    pub fn noun(self) -> &'static str {
        match self {
            Self::Passphrase => "passphrase",
            Self::KeyFile => "key file",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "passphrase" => Some(Self::Passphrase),
            "keyfile" => Some(Self::KeyFile),
            _ => None,
        }
    }
}

impl std::fmt::Display for UnsealKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Passphrase => "a passphrase",
            Self::KeyFile => "a key file",
        })
    }
}

/// argon2id cost parameters. Stored beside the salt so they can be raised for new stores
/// without breaking old ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub passes: u32,
    /// Lanes.
    pub lanes: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: the floor this product ships with (RFC 9106's second
    /// recommended option).
    fn default() -> Self {
        Self {
            memory_kib: 64 * 1024,
            passes: 3,
            lanes: 1,
        }
    }
}

impl KdfParams {
    /// Largest memory cost accepted from a file: 4 GiB. A crafted backup must not make a
    /// restore allocate without bound.
    pub const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    /// Largest pass count accepted from a file.
    pub const MAX_PASSES: u32 = 64;
    /// Largest lane count accepted from a file.
    pub const MAX_LANES: u32 = 16;

    /// Largest memory cost a backup file may ask for: 256 MiB (four times the default).
    /// Anyone can hand an operator a backup file; its header must not cost a gigabyte.
    pub const FILE_MAX_MEMORY_KIB: u32 = 256 * 1024;
    /// Largest pass count a backup file may ask for.
    pub const FILE_MAX_PASSES: u32 = 4;
    /// Largest lane count a backup file may ask for.
    pub const FILE_MAX_LANES: u32 = 4;

    /// Cheap parameters for tests only: a passphrase store made with these is easy to
    /// brute-force.
    pub fn insecure_for_tests() -> Self {
        Self {
            memory_kib: 64,
            passes: 1,
            lanes: 1,
        }
    }

    pub(crate) fn validate(self) -> Result<Self, &'static str> {
        if self.lanes == 0 || self.lanes > Self::MAX_LANES {
            return Err("argon2 lane count out of range");
        }
        if self.passes == 0 || self.passes > Self::MAX_PASSES {
            return Err("argon2 pass count out of range");
        }
        if self.memory_kib < 8 * self.lanes || self.memory_kib > Self::MAX_MEMORY_KIB {
            return Err("argon2 memory cost out of range");
        }
        Ok(self)
    }

    /// The tighter bounds for parameters read from (or written to) a backup file: at most
    /// [`Self::FILE_MAX_MEMORY_KIB`], [`Self::FILE_MAX_PASSES`] and
    /// [`Self::FILE_MAX_LANES`], so the worst header costs seconds and 256 MiB.
    pub(crate) fn validate_for_file(self) -> Result<Self, &'static str> {
        let this = self.validate()?;
        if this.memory_kib > Self::FILE_MAX_MEMORY_KIB {
            return Err("argon2 memory cost above 256 MiB, the most a backup file may ask for");
        }
        if this.passes > Self::FILE_MAX_PASSES {
            return Err("argon2 pass count above 4, the most a backup file may ask for");
        }
        if this.lanes > Self::FILE_MAX_LANES {
            return Err("argon2 lane count above 4, the most a backup file may ask for");
        }
        Ok(this)
    }

    /// Derives `out.len()` bytes from `password` and `salt` with argon2id.
    pub(crate) fn derive(self, password: &[u8], salt: &[u8], out: &mut [u8]) -> Result<(), Error> {
        let params = argon2::Params::new(self.memory_kib, self.passes, self.lanes, Some(out.len()))
            .map_err(|e| Error::Kdf(e.to_string()))?;
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_into(password, salt, out)
            .map_err(|e| Error::Kdf(e.to_string()))
    }
}
