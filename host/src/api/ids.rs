//! Ids and tokens: a readable prefix and 128+ random bits, nothing derived
//! from data.

use data_encoding::BASE32_NOPAD;

/// `n` random bytes in lower-case base32.
pub fn random_base32(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS RNG is available");
    BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
}

/// `<prefix>_` and 128 random bits.
pub fn new(prefix: &str) -> String {
    format!("{prefix}_{}", random_base32(16))
}

/// True when `id` has the prefix and the shape [`new`] gives it.
pub fn looks_like(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|body| {
            body.len() == 26
                && body
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        })
}
