//! TLS for the gRPC servers, and mutual TLS where a client CA is given: the same flags on
//! the target service, the draft service and `ouro serve`. Kubernetes' gRPC probes speak
//! plaintext only, so a TLS server can answer health (and nothing else) in plaintext on a
//! second port.

use anyhow::Context;
use clap::Args;
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "OURO_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "OURO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients whose certificate this CA (PEM) signed.
    #[arg(long, env = "OURO_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// With TLS, also answer gRPC health (only) in plaintext here, for probes that cannot
    /// speak TLS (Kubernetes' gRPC probes), e.g. 0.0.0.0:8086.
    #[arg(long, env = "OURO_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
}

/// How a server listens: its TLS, and a plaintext health port beside it.
#[derive(Clone, Debug, Default)]
pub struct Listening {
    pub tls: Option<ServerTlsConfig>,
    pub health_listen: Option<String>,
}

pub fn read_pem(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

impl TlsArgs {
    /// The server's TLS configuration, read from the files (none without --tls-cert).
    pub fn listening(&self) -> anyhow::Result<Listening> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(
                    read_pem(cert, "TLS certificate")?,
                    read_pem(key, "TLS key")?,
                );
                let mut config = ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &self.tls_client_ca {
                    let ca = Certificate::from_pem(read_pem(ca, "client CA")?);
                    config = config.client_ca_root(ca);
                }
                Some(config)
            }
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        if tls.is_none() && self.health_listen.is_some() {
            anyhow::bail!("--health-listen is for TLS servers (give --tls-cert and --tls-key)");
        }
        Ok(Listening {
            tls,
            health_listen: self.health_listen.clone(),
        })
    }
}
