//! The associated data that binds a wrapped data key to its place.

use crate::types::{KekId, KekVersion, KeyRef};

const DOMAIN: &[u8] = b"coffer/data-key-wrap/v1";

/// AAD = domain ‖ len(key ref) ‖ key ref ‖ len(KEK id) ‖ KEK id ‖ version,
/// lengths as big-endian u16 so no two tuples encode alike.
pub(crate) fn wrap_aad(key_ref: &KeyRef, kek: &KekId, version: KekVersion) -> Vec<u8> {
    let mut aad =
        Vec::with_capacity(DOMAIN.len() + 8 + key_ref.as_bytes().len() + kek.as_str().len());
    aad.extend_from_slice(DOMAIN);
    for field in [key_ref.as_bytes(), kek.as_str().as_bytes()] {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(&field[..usize::from(len)]);
    }
    aad.extend_from_slice(&version.0.to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_cannot_slide_into_each_other() {
        let kek = KekId::random().unwrap();
        let a = wrap_aad(&KeyRef::new(b"ab".to_vec()), &kek, KekVersion(1));
        let b = wrap_aad(&KeyRef::new(b"a".to_vec()), &kek, KekVersion(1));
        let c = wrap_aad(&KeyRef::new(b"ab".to_vec()), &kek, KekVersion(2));
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
