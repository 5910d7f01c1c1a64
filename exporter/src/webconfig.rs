//! `--web.config.file`: TLS and basic authentication, in the file format of the
//! Prometheus exporter toolkit, so that the same file and the same Prometheus
//! `scrape_config` (`scheme: https`, `tls_config`, `basic_auth`) work for Vigil.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt        # relative paths are relative to this file
//!   key_file: server.key
//!   client_ca_file: ca.crt       # optional: with client_auth_type
//!   client_auth_type: RequireAndVerifyClientCert   # or NoClientCert (default)
//! basic_auth_users:
//!   prometheus: $2y$10$...       # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! Every error names the file and the key. Unknown keys are errors: a typo must not
//! leave an endpoint open that its operator meant to protect.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    client_auth_type: Option<String>,
}

/// What the HTTP server enforces.
#[derive(Default)]
pub struct WebSecurity {
    /// TLS on every connection, when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// User name -> bcrypt hash; empty: no authentication.
    users: BTreeMap<String, String>,
    /// `Authorization` values that verified: bcrypt is slow by design, and Prometheus
    /// sends the same header every scrape. Bounded.
    verified: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for WebSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSecurity")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Verified headers kept at most.
const MAX_VERIFIED: usize = 64;

impl WebSecurity {
    /// Whether requests must authenticate.
    pub fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Checks an `Authorization` header value (`Basic base64(user:password)`).
    pub fn authorized(&self, header: Option<&[u8]>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some(h) = header.and_then(|h| std::str::from_utf8(h).ok()) else {
            return false;
        };
        if crate::util::lock(&self.verified).contains(h) {
            return true;
        }
        let Some(b64) = h
            .strip_prefix("Basic ")
            .or_else(|| h.strip_prefix("basic "))
        else {
            return false;
        };
        let Some(decoded) = base64_decode(b64.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, pass)) = text.split_once(':') else {
            return false;
        };
        let ok = self
            .users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(pass, hash).unwrap_or(false));
        if ok {
            let mut v = crate::util::lock(&self.verified);
            if v.len() >= MAX_VERIFIED {
                v.clear();
            }
            v.insert(h.to_string());
        }
        ok
    }
}

/// Standard base64 (with or without padding); None if it is not.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        match chunk.len() {
            4 => out.extend_from_slice(&bytes),
            3 => out.extend_from_slice(&bytes[..2]),
            2 => out.push(bytes[0]),
            _ => return None,
        }
    }
    Some(out)
}

/// Reads and checks the file at `path`: the certificates and key load, the client CA
/// loads when asked for, every user's hash is a bcrypt hash.
pub fn load(path: &Path) -> Result<WebSecurity, String> {
    let name = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--web.config.file {name}: {e}"))?;
    let file: File = if text.trim().is_empty() {
        File {
            tls_server_config: None,
            basic_auth_users: BTreeMap::new(),
        }
    } else {
        serde_yaml::from_str(&text).map_err(|e| format!("--web.config.file {name}: {e}"))?
    };
    for (user, hash) in &file.basic_auth_users {
        if hash.parse::<bcrypt::HashParts>().is_err() {
            return Err(format!(
                "--web.config.file {name}: basic_auth_users.{user}: not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
            ));
        }
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let tls = match file.tls_server_config {
        None => None,
        Some(t) => Some(
            tls_acceptor(&t, base)
                .map_err(|e| format!("--web.config.file {name}: tls_server_config.{e}"))?,
        ),
    };
    Ok(WebSecurity {
        tls,
        users: file.basic_auth_users,
        verified: Mutex::new(HashSet::new()),
    })
}

fn tls_acceptor(t: &TlsFile, base: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let at = |p: &Path| base.join(p);
    let cert_path = at(&t.cert_file);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect())
        .map_err(|e| format!("cert_file {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {}: no certificate in it",
            cert_path.display()
        ));
    }
    let key_path = at(&t.key_file);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("key_file {}: {e}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("protocol versions: {e}"))?;
    let auth = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match auth {
        "NoClientCert" => builder.with_no_client_auth(),
        "RequireAndVerifyClientCert" => {
            let ca = t
                .client_ca_file
                .as_ref()
                .ok_or("client_auth_type: RequireAndVerifyClientCert needs client_ca_file")?;
            let ca_path = at(ca);
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&ca_path)
                .map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?
            {
                let c = c.map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("client_ca_file {}: {e}", ca_path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        other => {
            return Err(format!(
                "client_auth_type: {other:?} is not supported (NoClientCert or RequireAndVerifyClientCert)"
            ))
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("cert_file/key_file: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_the_basic_auth_form() {
        assert_eq!(base64_decode("YWxpY2U6czNjcmV0").unwrap(), b"alice:s3cret");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert!(base64_decode("***").is_none());
    }

    #[test]
    fn users_are_checked_against_bcrypt_hashes_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let p = dir.path().join("web.yml");
        std::fs::write(&p, format!("basic_auth_users:\n  alice: '{hash}'\n")).unwrap();
        let w = load(&p).unwrap();
        assert!(w.requires_auth() && w.tls.is_none());
        assert!(w.authorized(Some(b"Basic YWxpY2U6czNjcmV0")));
        assert!(w.authorized(Some(b"Basic YWxpY2U6czNjcmV0")), "cached");
        assert!(
            !w.authorized(Some(b"Basic YWxpY2U6d3Jvbmc=")),
            "alice:wrong"
        );
        assert!(!w.authorized(None));
        assert!(!w.authorized(Some(b"Bearer x")));
        std::fs::write(&p, "basic_auth_user:\n  alice: x\n").unwrap();
        let e = load(&p).unwrap_err();
        assert!(
            e.contains("web.yml") && e.contains("basic_auth_user"),
            "{e}"
        );
        std::fs::write(&p, "basic_auth_users:\n  alice: plaintext\n").unwrap();
        let e = load(&p).unwrap_err();
        assert!(
            e.contains("basic_auth_users.alice") && e.contains("bcrypt"),
            "{e}"
        );
        std::fs::write(
            &p,
            "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
        )
        .unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.contains("cert_file") && e.contains("nope.crt"), "{e}");
    }
}
