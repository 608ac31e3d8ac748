//! The development stack's private certificate authority.
//!
//! One CA (ECDSA P-256) issues every certificate of a local stack: server
//! certificates for the hosts and Postgres nodes (names and loopback IPs),
//! and client certificates whose role is carried as a URI SAN
//! `urn:coffer:role:<role>` for the key host to enforce. Production uses the
//! institution's CA instead; nothing here is meant for it.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::tools::{SetupError, io_err};

/// Prefix of the URI SAN that names a client certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:coffer:role:";

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// The private CA of one stack, kept in a folder.
#[derive(Debug)]
pub struct DevCa {
    dir: PathBuf,
    key: KeyPair,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Coffer development CA");
    name.push(DnType::OrganizationName, "Coffer dev stack");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn setup_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> SetupError {
    move |e| SetupError::Failed {
        tool: "rcgen".into(),
        status: what.into(),
        stderr: e.to_string(),
    }
}

impl DevCa {
    /// Loads the CA from `dir`, or creates it there.
    pub fn open(dir: &Path) -> Result<Self, SetupError> {
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        if key_path.exists() && cert_path.exists() {
            let pem = fs::read_to_string(&key_path).map_err(io_err("cannot read", &key_path))?;
            let key = KeyPair::from_pem(&pem).map_err(setup_err("reading the CA key"))?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                key,
            });
        }
        let key = KeyPair::generate().map_err(setup_err("generating the CA key"))?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(setup_err("self-signing the CA"))?;
        write_private(&key_path, &key.serialize_pem())?;
        fs::write(&cert_path, cert.pem()).map_err(io_err("cannot write", &cert_path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
        })
    }

    /// The CA certificate (PEM) that every party trusts.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server certificate for `name` valid for `localhost`, `name` and 127.0.0.1,
    /// written as `<name>.pem` / `<name>.key` (reused if present).
    pub fn server(&self, name: &str) -> Result<IssuedCert, SetupError> {
        self.issue(name, |params| {
            params.subject_alt_names = vec![
                SanType::DnsName(ia5(name)?),
                SanType::DnsName(ia5("localhost")?),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            Ok(())
        })
    }

    /// A client certificate carrying `role`, written as `client-<role>.pem/.key`.
    pub fn client(&self, role: &str) -> Result<IssuedCert, SetupError> {
        self.issue(&format!("client-{role}"), |params| {
            params.subject_alt_names =
                vec![SanType::URI(ia5(&format!("{ROLE_URI_PREFIX}{role}"))?)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            Ok(())
        })
    }

    /// A client certificate for a database connection, common name `name`
    /// (clusters admit connections by name), as `<name>.pem/.key`.
    pub fn db_client(&self, name: &str) -> Result<IssuedCert, SetupError> {
        self.issue(name, |params| {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            Ok(())
        })
    }

    fn issue(
        &self,
        file_stem: &str,
        fill: impl FnOnce(&mut CertificateParams) -> Result<(), SetupError>,
    ) -> Result<IssuedCert, SetupError> {
        let issued = IssuedCert {
            cert: self.dir.join(format!("{file_stem}.pem")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        if issued.cert.exists() && issued.key.exists() {
            return Ok(issued);
        }
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, file_stem);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        fill(&mut params)?;
        let key = KeyPair::generate().map_err(setup_err("generating a key"))?;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(setup_err("signing a certificate"))?;
        write_private(&issued.key, &key.serialize_pem())?;
        fs::write(&issued.cert, cert.pem()).map_err(io_err("cannot write", &issued.cert))?;
        Ok(issued)
    }
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, SetupError> {
    s.try_into().map_err(setup_err("encoding a name"))
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> Result<(), SetupError> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("cannot write", path))?;
    file.write_all(pem.as_bytes())
        .map_err(io_err("cannot write", path))
}
