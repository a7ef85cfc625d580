//! rustls needs one process-wide crypto provider; kube, tokio-tungstenite and reqwest all
//! use the default one.

/// Install ring as the process default. Safe to call any number of times.
pub fn install_default_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
