//! How KEKs and their wrap counters are laid out on the token.
//!
//! A KEK version is an AES-256 secret key object with `CKA_LABEL` = KEK id
//! and `CKA_ID` = `"<KEK id>/v<version>"`. Its wrap counter is a private data
//! object with the same label and `CKA_APPLICATION` = `coffer/wrap-count/v<version>`.
//! The token itself is the source of truth: nothing about KEKs is kept
//! anywhere else.

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::error::{Error, Result};
use crate::types::{KekId, KekVersion};

use super::errors::ck;

/// `CKA_ID` of one KEK version.
pub(crate) fn version_id(kek: &KekId, version: KekVersion) -> Vec<u8> {
    format!("{kek}/v{}", version.0).into_bytes()
}

/// Parses a `CKA_ID` written by [`version_id`]; `None` for foreign objects.
pub(crate) fn parse_version_id(id: &[u8]) -> Option<(KekId, KekVersion)> {
    let text = std::str::from_utf8(id).ok()?;
    let (kek, version) = text.split_once("/v")?;
    Some((KekId::parse(kek).ok()?, KekVersion(version.parse().ok()?)))
}

fn counter_application(version: KekVersion) -> Vec<u8> {
    format!("coffer/wrap-count/v{}", version.0).into_bytes()
}

/// The template of a new KEK version: generated on the token, sensitive,
/// never extractable, encrypt/decrypt only (never wrap/unwrap, so no object
/// both wraps and decrypts), not copyable.
pub(crate) fn kek_template(kek: &KekId, version: KekVersion) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Copyable(false),
        Attribute::Modifiable(false),
        Attribute::Label(kek.as_str().as_bytes().to_vec()),
        Attribute::Id(version_id(kek, version)),
    ]
}

/// `CKA_ID` of a KEK's linking key.
pub(crate) fn link_id(kek: &KekId) -> Vec<u8> {
    format!("{kek}/link").into_bytes()
}

/// The template of a KEK's linking key: a generic secret made on the token
/// that can only compute MACs (`CKM_SHA256_HMAC`), never encrypt, decrypt,
/// wrap or leave the token. Same label as the KEK, so destroying the KEK's
/// objects destroys it too.
pub(crate) fn link_template(kek: &KekId) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Copyable(false),
        Attribute::Modifiable(false),
        Attribute::Label(kek.as_str().as_bytes().to_vec()),
        Attribute::Id(link_id(kek)),
    ]
}

/// The linking key of a KEK, if present.
pub(crate) fn find_link(session: &Session, kek: &KekId) -> Result<Option<ObjectHandle>> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(link_id(kek)),
        ])
        .map_err(ck("C_FindObjects"))?;
    Ok(found.first().copied())
}

/// The template of a new wrap counter at `mark`.
pub(crate) fn counter_template(kek: &KekId, version: KekVersion, mark: u64) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(true),
        Attribute::Label(kek.as_str().as_bytes().to_vec()),
        Attribute::Application(counter_application(version)),
        Attribute::Value(mark.to_be_bytes().to_vec()),
    ]
}

/// The secret key object of one KEK version, if present.
pub(crate) fn find_version(
    session: &Session,
    kek: &KekId,
    version: KekVersion,
) -> Result<Option<ObjectHandle>> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(version_id(kek, version)),
        ])
        .map_err(ck("C_FindObjects"))?;
    Ok(found.first().copied())
}

/// The live versions of a KEK, oldest first.
pub(crate) fn versions(session: &Session, kek: &KekId) -> Result<Vec<KekVersion>> {
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(kek.as_str().as_bytes().to_vec()),
        ])
        .map_err(ck("C_FindObjects"))?;
    let mut versions = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some((id, version)) = read_version_id(session, key)?
            && &id == kek
        {
            versions.push(version);
        }
    }
    versions.sort();
    Ok(versions)
}

/// The KEK id and version an object carries, if it is one of ours.
pub(crate) fn read_version_id(
    session: &Session,
    object: ObjectHandle,
) -> Result<Option<(KekId, KekVersion)>> {
    let attributes = session
        .get_attributes(object, &[AttributeType::Id])
        .map_err(ck("C_GetAttributeValue"))?;
    Ok(attributes.iter().find_map(|a| match a {
        Attribute::Id(id) => parse_version_id(id),
        _ => None,
    }))
}

/// The wrap counter objects of one KEK version (normally one; two after a
/// crash between writing a new mark and removing the old one).
pub(crate) fn find_counters(
    session: &Session,
    kek: &KekId,
    version: KekVersion,
) -> Result<Vec<ObjectHandle>> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(kek.as_str().as_bytes().to_vec()),
            Attribute::Application(counter_application(version)),
        ])
        .map_err(ck("C_FindObjects"))
}

/// Reads a wrap counter's mark.
fn read_counter(session: &Session, counter: ObjectHandle) -> Result<u64> {
    let attributes = session
        .get_attributes(counter, &[AttributeType::Value])
        .map_err(ck("C_GetAttributeValue"))?;
    attributes
        .iter()
        .find_map(|a| match a {
            Attribute::Value(v) => <[u8; 8]>::try_from(v.as_slice())
                .ok()
                .map(u64::from_be_bytes),
            _ => None,
        })
        .ok_or_else(|| Error::State("wrap counter object has no 8-byte value".into()))
}

/// Advances the persisted mark of a KEK version with `advance(old) -> new`
/// and returns `old..new`. Data object values are read-only on some tokens
/// (SoftHSM), so the new mark is a new object, written before the old ones
/// are removed: a crash in between leaves two, and the highest counts.
pub(crate) fn advance_counter(
    session: &Session,
    kek: &KekId,
    version: KekVersion,
    advance: impl FnOnce(u64) -> std::ops::Range<u64>,
) -> Result<std::ops::Range<u64>> {
    let old = find_counters(session, kek, version)?;
    let mut mark = 0;
    for counter in &old {
        mark = mark.max(read_counter(session, *counter)?);
    }
    let range = advance(mark);
    session
        .create_object(&counter_template(kek, version, range.end))
        .map_err(ck("C_CreateObject"))?;
    for counter in old {
        session
            .destroy_object(counter)
            .map_err(ck("C_DestroyObject"))?;
    }
    Ok(range)
}

/// Every object (keys and counters) of a KEK, or of one of its versions.
pub(crate) fn all_objects(
    session: &Session,
    kek: &KekId,
    version: Option<KekVersion>,
) -> Result<Vec<ObjectHandle>> {
    let label = Attribute::Label(kek.as_str().as_bytes().to_vec());
    let Some(version) = version else {
        return session.find_objects(&[label]).map_err(ck("C_FindObjects"));
    };
    let mut objects = find_counters(session, kek, version)?;
    objects.extend(find_version(session, kek, version)?);
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ids_round_trip_and_foreign_ids_are_ignored() {
        let kek = KekId::random().unwrap();
        let id = version_id(&kek, KekVersion(12));
        assert_eq!(parse_version_id(&id), Some((kek, KekVersion(12))));
        assert_eq!(parse_version_id(b"someone else's key"), None);
        assert_eq!(parse_version_id(b"kek_zz/vx"), None);
    }
}
