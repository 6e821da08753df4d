//! TLS for Switchyard's gRPC listeners and clients, from PEM files (rustls underneath, through
//! tonic): a server identity with an optional client CA (mutual TLS), and a client trust root
//! with an optional client identity.
//!
//! Invariant: a listener configured with a client CA accepts only clients presenting a
//! certificate that CA signed; nothing here falls back to plaintext.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    let b = std::fs::read(p).map_err(|source| TlsError::File {
        path: p.to_path_buf(),
        source,
    })?;
    if !String::from_utf8_lossy(&b).contains("-----BEGIN") {
        return Err(TlsError::Config(format!("{}: not a PEM file", p.display())));
    }
    Ok(b)
}

/// A listener's certificate and key, and the CA its clients must present certificates from.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// From optional flags: none given is plaintext; a certificate needs its key and the
    /// reverse; a client CA needs both.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
        what: &str,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key) {
            (Some(c), Some(k)) => Ok(Some(ServerTls {
                cert: c.to_path_buf(),
                key: k.to_path_buf(),
                client_ca: client_ca.map(Path::to_path_buf),
            })),
            (None, None) if client_ca.is_none() => Ok(None),
            _ => Err(TlsError::Config(format!(
                "{what}: TLS needs both a certificate and its key (a client CA needs both too)"
            ))),
        }
    }

    /// The PEM contents: certificate chain, key, client CA.
    pub fn pems(&self) -> Result<(Vec<u8>, Vec<u8>, Option<Vec<u8>>), TlsError> {
        Ok((
            read(&self.cert)?,
            read(&self.key)?,
            self.client_ca.as_deref().map(read).transpose()?,
        ))
    }

    /// The tonic server configuration.
    pub fn tonic(&self) -> Result<ServerTlsConfig, TlsError> {
        let (cert, key, ca) = self.pems()?;
        let mut c = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = ca {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(c)
    }
}

/// What a client trusts (the servers' CA) and, for mutual TLS, who it is.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// The tonic client configuration (the server name comes from each URL).
    pub fn tonic(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs its key (and the key its certificate)".into(),
                ))
            }
        }
        Ok(c)
    }
}
