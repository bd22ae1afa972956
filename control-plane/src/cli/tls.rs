//! The API's TLS (rustls, ring): the certificate and key from PEM files, swapped on SIGHUP for
//! new handshakes while the connections already open go on.

use axum_server::tls_rustls::RustlsConfig;
use std::path::Path;

pub async fn load(cert: &Path, key: &Path) -> Result<RustlsConfig, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    RustlsConfig::from_pem_file(cert, key)
        .await
        .map_err(|e| format!("cannot load the API's TLS certificate {} and key {}: {e}", cert.display(), key.display()))
}
