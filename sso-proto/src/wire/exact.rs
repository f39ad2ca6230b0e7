//! Exactly-sized, zeroizing JSON serialisation for bodies that carry key material: one
//! writer function runs twice, first into a [`Count`], then into a [`WipingBuf`] of exactly
//! that size, so the buffer never reallocates and no unwiped copy of a key is left behind.
//! Every writer of a body that holds key material in this module goes through [`exact`].

use zeroize::Zeroizing;

/// Where serialised JSON goes: first a [`Count`] to learn the exact length, then a
/// [`WipingBuf`] of exactly that capacity. One writer function serves both passes, so the
/// length can never disagree with what is written.
pub trait Sink {
    /// Appends bytes that are not secret.
    fn put(&mut self, bytes: &[u8]);
    /// Appends a key's material, standard base64.
    fn put_secret(&mut self, secret: &crate::MasterSecret);
}

/// Length of a key's material in standard base64 (32 bytes → 44 characters).
const SECRET_B64_LEN: usize = 44;

/// Counts bytes: the first pass.
#[derive(Debug, Default)]
pub struct Count(pub usize);

impl Sink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }

    fn put_secret(&mut self, _: &crate::MasterSecret) {
        self.0 += SECRET_B64_LEN;
    }
}

/// A buffer for key material that never reallocates in place: should it ever need more
/// room than it was sized for, it copies into a new zeroizing buffer and wipes the old one
/// (so no unwiped copy of a key is left in freed memory), and counts the event.
#[derive(Debug)]
pub struct WipingBuf {
    buf: Zeroizing<Vec<u8>>,
    grew: usize,
}

impl WipingBuf {
    /// An empty buffer of exactly `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Zeroizing::new(Vec::with_capacity(capacity)),
            grew: 0,
        }
    }

    fn room(&mut self, n: usize) {
        let need = self.buf.len().saturating_add(n);
        if need > self.buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(self.buf.capacity().saturating_mul(2))));
            bigger.extend_from_slice(&self.buf);
            // The old buffer is zeroized (its whole capacity) as it is dropped here.
            self.buf = bigger;
            self.grew += 1;
        }
    }

    /// How often it had to grow (0 when the first pass sized it exactly).
    pub fn grew(&self) -> usize {
        self.grew
    }

    /// The bytes written.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.buf
    }
}

impl Sink for WipingBuf {
    fn put(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.buf.extend_from_slice(bytes);
    }

    fn put_secret(&mut self, secret: &crate::MasterSecret) {
        self.room(SECRET_B64_LEN);
        secret.push_base64(&mut self.buf);
    }
}

/// Serialises with `write` twice: once to count, once into a buffer of exactly that size.
pub fn exact(write: impl Fn(&mut dyn Sink)) -> Zeroizing<Vec<u8>> {
    let mut count = Count::default();
    write(&mut count);
    let mut out = WipingBuf::with_capacity(count.0);
    write(&mut out);
    debug_assert_eq!(out.grew(), 0, "the serialiser's two passes disagree");
    out.into_inner()
}
