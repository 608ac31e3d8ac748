//! STREAM sealing and opening of one record.

use std::fmt;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{ENVELOPE_V1, SEGMENT_SIZE, TAG_SIZE};

/// A record's keys, as the key host hands them out. Zeroized on drop.
pub struct RecordKeys {
    /// AES-256-GCM data key.
    pub enc: Zeroizing<[u8; 32]>,
    /// HMAC-SHA256 key.
    pub mac: Zeroizing<[u8; 32]>,
    /// Nonce prefix (the first 7 bytes of the key host's nonce).
    pub nonce_prefix: [u8; 7],
}

impl fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordKeys(<redacted>)")
    }
}

/// The API host's digest over (tenant, study, token, participant, format):
/// opaque here, bound into every segment's AAD.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ContextDigest(pub [u8; 32]);

/// Why an envelope does not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The header is not one this version reads.
    #[error("unknown envelope header")]
    BadHeader,
    /// A segment's tag failed: altered, reordered, truncated, or presented
    /// with another record's keys or context.
    #[error("a segment failed authentication")]
    SegmentTag,
    /// The MAC over the segment tags does not match, or segments are missing.
    #[error("the record's MAC does not match")]
    Mac,
    /// The stored layout is not whole segments.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
}

/// The envelope header (chunk 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Plaintext bytes per segment.
    pub segment_size: u32,
}

impl Header {
    const LEN: usize = 8;

    fn current() -> Self {
        Self {
            segment_size: SEGMENT_SIZE as u32,
        }
    }

    /// `[version][0;3][segment size u32 BE]`.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = ENVELOPE_V1;
        b[4..].copy_from_slice(&self.segment_size.to_be_bytes());
        b
    }

    /// Parses a stored header.
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let bytes: [u8; Self::LEN] = bytes.try_into().map_err(|_| EnvelopeError::BadHeader)?;
        let segment_size = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if bytes[0] != ENVELOPE_V1 || bytes[1..4] != [0; 3] || segment_size as usize != SEGMENT_SIZE
        {
            return Err(EnvelopeError::BadHeader);
        }
        Ok(Self { segment_size })
    }
}

fn nonce(prefix: &[u8; 7], counter: u32, last: bool) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n.into()
}

fn aad(header: &[u8; 8], digest: &ContextDigest) -> [u8; 40] {
    let mut a = [0u8; 40];
    a[..8].copy_from_slice(header);
    a[8..].copy_from_slice(&digest.0);
    a
}

fn new_mac(keys: &RecordKeys, header: &[u8; 8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&keys.mac[..])
        .expect("HMAC takes any key length");
    mac.update(header);
    mac
}

/// Seals a record as it streams in.
pub struct Sealer {
    cipher: Aes256Gcm,
    mac: Hmac<Sha256>,
    prefix: [u8; 7],
    aad: [u8; 40],
    header: [u8; 8],
    counter: u32,
    /// Plaintext not sealed yet: up to one segment, held back until we know
    /// whether it is the last.
    pending: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("segments", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for one record; `header()` is chunk 0.
    pub fn new(keys: &RecordKeys, digest: &ContextDigest) -> Self {
        let header = Header::current().to_bytes();
        Self {
            cipher: Aes256Gcm::new((&*keys.enc).into()),
            mac: new_mac(keys, &header),
            prefix: keys.nonce_prefix,
            aad: aad(&header, digest),
            header,
            counter: 0,
            pending: Zeroizing::new(Vec::with_capacity(SEGMENT_SIZE)),
        }
    }

    /// The header bytes (chunk 0).
    pub fn header(&self) -> [u8; 8] {
        self.header
    }

    /// Takes plaintext; appends every segment that is now sealed to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        while !data.is_empty() {
            if self.pending.len() == SEGMENT_SIZE {
                // More data follows, so the held-back segment is not the last.
                self.seal_pending(false, out)?;
            }
            let take = (SEGMENT_SIZE - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Seals the last segment into `out` and returns the trailer.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<Vec<u8>, EnvelopeError> {
        self.seal_pending(true, out)?;
        self.mac.update(&u64::from(self.counter).to_be_bytes());
        let mut trailer = self.mac.finalize().into_bytes().to_vec();
        trailer.extend_from_slice(&u64::from(self.counter).to_be_bytes());
        Ok(trailer)
    }

    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        let start = out.len();
        out.extend_from_slice(&self.pending);
        self.pending.clear();
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &nonce(&self.prefix, self.counter, last),
                &self.aad,
                (&mut out[start..]).into(),
            )
            .map_err(|_| EnvelopeError::Malformed("segment too long"))?;
        out.extend_from_slice(&tag);
        self.mac.update(&tag);
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or(EnvelopeError::Malformed("too many segments"))?;
        Ok(())
    }
}

/// Opens a record segment by segment.
pub struct Opener {
    cipher: Aes256Gcm,
    mac: Hmac<Sha256>,
    prefix: [u8; 7],
    aad: [u8; 40],
    counter: u32,
    ended: bool,
    /// Opened from a later segment on: the MAC over every tag cannot be
    /// checked (each segment's own tag still is, at its position).
    seeked: bool,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("segments", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// An opener for a record whose stored header is `header`.
    pub fn new(
        keys: &RecordKeys,
        digest: &ContextDigest,
        header: &[u8],
    ) -> Result<Self, EnvelopeError> {
        Header::parse(header)?;
        let header: [u8; 8] = header.try_into().map_err(|_| EnvelopeError::BadHeader)?;
        Ok(Self {
            cipher: Aes256Gcm::new((&*keys.enc).into()),
            mac: new_mac(keys, &header),
            prefix: keys.nonce_prefix,
            aad: aad(&header, digest),
            counter: 0,
            ended: false,
            seeked: false,
        })
    }

    /// Starts opening at segment `index` instead of 0 (a range read). Each
    /// segment still only opens at its own position (the index is in its
    /// nonce) and the last one only as the last; [`Opener::finish`] refuses
    /// afterwards, since the earlier tags were never seen.
    pub fn seek(&mut self, index: u32) -> Result<(), EnvelopeError> {
        if self.counter != 0 || self.ended {
            return Err(EnvelopeError::Malformed("seek after opening segments"));
        }
        self.counter = index;
        self.seeked = index > 0;
        Ok(())
    }

    fn decrypt(&self, sealed: &[u8], last: bool) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        if sealed.len() < TAG_SIZE || sealed.len() > SEGMENT_SIZE + TAG_SIZE {
            return Err(EnvelopeError::Malformed("segment length"));
        }
        let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_SIZE);
        let mut plain = Zeroizing::new(ciphertext.to_vec());
        let tag = Tag::<aes_gcm::aead::consts::U16>::try_from(tag)
            .map_err(|_| EnvelopeError::Malformed("tag"))?;
        self.cipher
            .decrypt_inout_detached(
                &nonce(&self.prefix, self.counter, last),
                &self.aad,
                (&mut plain[..]).into(),
                &tag,
            )
            .map_err(|_| EnvelopeError::SegmentTag)?;
        Ok(plain)
    }

    /// Opens the next segment; its plaintext is released only because its
    /// tag verified. `last` must be true for the final segment.
    pub fn open(&mut self, sealed: &[u8], last: bool) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        if self.ended {
            return Err(EnvelopeError::Malformed("segments after the last"));
        }
        let plain = self.decrypt(sealed, last)?;
        self.mac.update(&sealed[sealed.len() - TAG_SIZE..]);
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or(EnvelopeError::Malformed("too many segments"))?;
        self.ended = last;
        Ok(plain)
    }

    /// Checks the trailer once every segment is opened. Leaves the opener
    /// as it was, so a damaged trailer can be retried from another replica.
    pub fn finish(&self, trailer: &[u8]) -> Result<(), EnvelopeError> {
        if !self.ended || self.seeked || trailer.len() != 40 {
            return Err(EnvelopeError::Mac);
        }
        let count = u64::from(self.counter).to_be_bytes();
        if trailer[32..] != count {
            return Err(EnvelopeError::Mac);
        }
        let mut mac = self.mac.clone();
        mac.update(&count);
        // Constant-time comparison.
        mac.verify_slice(&trailer[..32])
            .map_err(|_| EnvelopeError::Mac)
    }
}

/// Splits the stored segments of one data chunk.
pub fn segments(chunk: &[u8]) -> impl Iterator<Item = &[u8]> {
    chunk.chunks(super::SEALED_SEGMENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SEALED_SEGMENT;

    fn keys(seed: u8) -> RecordKeys {
        RecordKeys {
            enc: Zeroizing::new([seed; 32]),
            mac: Zeroizing::new([seed.wrapping_add(1); 32]),
            nonce_prefix: [seed; 7],
        }
    }

    fn seal(
        keys: &RecordKeys,
        digest: &ContextDigest,
        plain: &[u8],
        pieces: usize,
    ) -> ([u8; 8], Vec<u8>, Vec<u8>) {
        let mut sealer = Sealer::new(keys, digest);
        let mut out = Vec::new();
        for piece in plain.chunks(plain.len().div_ceil(pieces).max(1)) {
            sealer.push(piece, &mut out).unwrap();
        }
        let header = sealer.header();
        let trailer = sealer.finish(&mut out).unwrap();
        (header, out, trailer)
    }

    fn open(
        keys: &RecordKeys,
        digest: &ContextDigest,
        header: &[u8],
        sealed: &[u8],
        trailer: &[u8],
    ) -> Result<Vec<u8>, EnvelopeError> {
        let mut opener = Opener::new(keys, digest, header)?;
        let segs: Vec<&[u8]> = segments(sealed).collect();
        let mut plain = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            plain.extend_from_slice(&opener.open(s, i + 1 == segs.len())?);
        }
        opener.finish(trailer)?;
        Ok(plain)
    }

    #[test]
    fn the_stored_size_gives_back_the_plaintext_length() {
        let (k, d) = (keys(5), ContextDigest([6; 32]));
        for len in [
            0,
            1,
            SEGMENT_SIZE - 1,
            SEGMENT_SIZE,
            SEGMENT_SIZE + 1,
            3 * SEGMENT_SIZE,
        ] {
            let (header, sealed, trailer) = seal(&k, &d, &vec![1u8; len], 2);
            let stored = header.len() + sealed.len() + trailer.len();
            assert_eq!(
                crate::crypto::plaintext_len(stored as u64),
                Some(len as u64),
                "{len}"
            );
        }
    }

    #[test]
    fn a_seek_opens_later_segments_only_at_their_position_and_never_finishes() {
        let (k, d) = (keys(3), ContextDigest([4; 32]));
        let plain: Vec<u8> = (0..3 * SEGMENT_SIZE + 100).map(|i| i as u8).collect();
        let (header, sealed, trailer) = seal(&k, &d, &plain, 1);
        let segs: Vec<&[u8]> = segments(&sealed).collect();
        assert_eq!(segs.len(), 4);

        let mut opener = Opener::new(&k, &d, &header).unwrap();
        opener.seek(2).unwrap();
        let third = opener.open(segs[2], false).unwrap();
        assert_eq!(&third[..], &plain[2 * SEGMENT_SIZE..3 * SEGMENT_SIZE]);
        let last = opener.open(segs[3], true).unwrap();
        assert_eq!(&last[..], &plain[3 * SEGMENT_SIZE..]);
        assert!(opener.finish(&trailer).is_err(), "the MAC needs every tag");

        // A segment opened at another position, or not as the last, fails.
        let mut wrong = Opener::new(&k, &d, &header).unwrap();
        wrong.seek(1).unwrap();
        assert!(wrong.open(segs[2], false).is_err());
        let mut early_end = Opener::new(&k, &d, &header).unwrap();
        early_end.seek(2).unwrap();
        assert!(early_end.open(segs[2], true).is_err());
        // No seek once segments were opened.
        let mut started = Opener::new(&k, &d, &header).unwrap();
        started.open(segs[0], false).unwrap();
        assert!(started.seek(2).is_err());
    }

    #[test]
    fn round_trips_every_size_around_segment_boundaries() {
        let d = ContextDigest([9; 32]);
        for len in [
            0,
            1,
            SEGMENT_SIZE - 1,
            SEGMENT_SIZE,
            SEGMENT_SIZE + 1,
            3 * SEGMENT_SIZE + 17,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for pieces in [1, 7] {
                let (h, sealed, t) = seal(&keys(1), &d, &plain, pieces);
                assert_eq!(
                    sealed.len(),
                    len + len.div_ceil(SEGMENT_SIZE).max(1) * TAG_SIZE,
                    "len {len}"
                );
                assert_eq!(
                    open(&keys(1), &d, &h, &sealed, &t).unwrap(),
                    plain,
                    "len {len}"
                );
            }
        }
    }

    #[test]
    fn another_context_or_key_does_not_open() {
        let (h, sealed, t) = seal(&keys(1), &ContextDigest([1; 32]), b"hello", 1);
        assert_eq!(
            open(&keys(1), &ContextDigest([2; 32]), &h, &sealed, &t),
            Err(EnvelopeError::SegmentTag)
        );
        assert_eq!(
            open(&keys(2), &ContextDigest([1; 32]), &h, &sealed, &t),
            Err(EnvelopeError::SegmentTag)
        );
    }

    #[test]
    fn flips_truncation_and_reordering_are_detected() {
        let d = ContextDigest([3; 32]);
        let plain = vec![5u8; 3 * SEGMENT_SIZE];
        let (h, sealed, t) = seal(&keys(4), &d, &plain, 1);
        let mut flipped = sealed.clone();
        flipped[SEGMENT_SIZE + 100] ^= 1;
        assert_eq!(
            open(&keys(4), &d, &h, &flipped, &t),
            Err(EnvelopeError::SegmentTag)
        );
        // Dropping the last segment: the new last was sealed as not-last.
        assert_eq!(
            open(&keys(4), &d, &h, &sealed[..2 * SEALED_SEGMENT], &t),
            Err(EnvelopeError::SegmentTag)
        );
        let mut swapped = sealed[SEALED_SEGMENT..2 * SEALED_SEGMENT].to_vec();
        swapped.extend_from_slice(&sealed[..SEALED_SEGMENT]);
        swapped.extend_from_slice(&sealed[2 * SEALED_SEGMENT..]);
        assert_eq!(
            open(&keys(4), &d, &h, &swapped, &t),
            Err(EnvelopeError::SegmentTag)
        );
        let mut bad_trailer = t.clone();
        bad_trailer[0] ^= 1;
        assert_eq!(
            open(&keys(4), &d, &h, &sealed, &bad_trailer),
            Err(EnvelopeError::Mac)
        );
        let mut bad_header = h;
        bad_header[0] = 9;
        assert_eq!(
            open(&keys(4), &d, &bad_header, &sealed, &t),
            Err(EnvelopeError::BadHeader)
        );
    }
}
