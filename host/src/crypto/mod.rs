//! The record envelope: every record and BLOB is a stream of fixed-size
//! AES-256-GCM segments (the STREAM construction) under the record's own data
//! key, plus an HMAC-SHA256 over the segment tags under the record's own MAC key.
//!
//! Stored layout, one blob per record:
//!
//! - **header** (chunk 0): format version, segment size.
//! - **data chunks** (1..): whole sealed segments, each `ciphertext ‖ tag`,
//!   [`SEGMENTS_PER_CHUNK`] per chunk (about 1 MiB).
//! - **trailer** (last chunk): `HMAC(mac_key, header ‖ tags… ‖ segment count)`
//!   and the segment count.
//!
//! Segment `i`'s nonce is `prefix(7) ‖ i as u32 BE ‖ last-flag`, so a segment
//! moved, dropped or cut short fails its tag, and the AAD of every segment is
//! `header ‖ context digest`: the same ciphertext presented for another record
//! (another tenant, study, token or participant) does not open. A reader
//! releases a segment only after its tag verifies; the HMAC is checked when
//! the stream ends (records: before anything is released). A range read
//! starts at the segment holding its first byte ([`Opener::seek`]): each
//! segment still opens only at its own position, but the HMAC over every tag
//! is not checked then.

mod stream;

pub use stream::{ContextDigest, EnvelopeError, Header, Opener, RecordKeys, Sealer, segments};

/// Plaintext bytes per segment.
pub const SEGMENT_SIZE: usize = 64 * 1024;
/// Tag bytes after each segment.
pub const TAG_SIZE: usize = 16;
/// Segments stored per blob chunk: 15 × (64 KiB + 16) stays under the
/// blob store's 1 MiB row limit.
pub const SEGMENTS_PER_CHUNK: usize = 15;
/// Bytes of one full sealed segment.
pub const SEALED_SEGMENT: usize = SEGMENT_SIZE + TAG_SIZE;
/// Bytes of one full data chunk.
pub const CHUNK_BYTES: usize = SEGMENTS_PER_CHUNK * SEALED_SEGMENT;
/// Format version of the envelope.
pub const ENVELOPE_V1: u8 = 1;

/// Bytes of the header chunk and of the trailer chunk.
const HEADER_BYTES: u64 = 8;
const TRAILER_BYTES: u64 = 40;

/// The plaintext length of an envelope stored in `stored` bytes (header,
/// sealed segments, trailer), or `None` if no envelope has that size.
pub fn plaintext_len(stored: u64) -> Option<u64> {
    let sealed = stored.checked_sub(HEADER_BYTES + TRAILER_BYTES)?;
    // Even an empty plaintext has one (empty) final segment.
    let segments = sealed.div_ceil(SEALED_SEGMENT as u64).max(1);
    sealed.checked_sub(segments * TAG_SIZE as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn plaintext_lengths_follow_from_stored_sizes() {
        for (plain, segments) in [
            (0u64, 1u64),
            (1, 1),
            (65_536, 1),
            (65_537, 2),
            (10 << 20, 160),
        ] {
            let stored = 8 + 40 + plain + 16 * segments;
            assert_eq!(super::plaintext_len(stored), Some(plain), "{plain}");
        }
        assert_eq!(super::plaintext_len(47), None);
    }
}
