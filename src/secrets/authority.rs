//! A VM's certificate authority for the credential broker. `up` makes it
//! with the VM (the guest trusts its certificate from the first boot, see
//! [`super::vm`]); the dataplane issues from it a certificate for each
//! secret host whose connection it terminates ([`Issuing`]).
//!
//! The authority is constrained twice: to no intermediates (path length
//! 0), and by name constraints to the secrets' hosts, so its key, were it
//! taken from the dataplane, signs nothing a guest client would accept for
//! any other name. It is per VM: one VM's authority means nothing to
//! another VM's guest.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Certificate and key of one VM's authority (PEM), with what rebuilds
/// its issuer: its common name and the hosts it is constrained to.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Authority {
    pub common_name: String,
    /// The hosts of the secrets (exact names, `*.suffix`).
    pub hosts: Vec<String>,
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("common_name", &self.common_name)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// The subtree a host pattern permits: `*.example.com` and
/// `example.com` both permit example.com and the names below it.
fn subtree(host: &str) -> GeneralSubtree {
    GeneralSubtree::DnsName(host.trim_start_matches("*.").to_string())
}

/// The authority's parameters: the same for the same name and hosts, so
/// that the dataplane rebuilds the issuer from them and the key.
fn params(common_name: &str, hosts: &[String]) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "migrant");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: hosts.iter().map(|h| subtree(h)).collect(),
        excluded_subtrees: Vec::new(),
    });
    p
}

impl Authority {
    /// A new authority for the VM `vm`, constrained to `hosts`.
    pub fn make(vm: &str, hosts: &[String]) -> Result<Authority, rcgen::Error> {
        let key = KeyPair::generate()?;
        let common_name = format!("migrant secrets of {vm}");
        let cert = params(&common_name, hosts).self_signed(&key)?;
        Ok(Authority {
            common_name,
            hosts: hosts.to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, String> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| format!("the authority's certificate: {e}"))
    }

    /// What issues certificates for the secret hosts.
    pub fn issuing(&self) -> Result<Issuing, String> {
        let key =
            KeyPair::from_pem(&self.key_pem).map_err(|e| format!("the authority's key: {e}"))?;
        let leaf_key = KeyPair::generate().map_err(|e| format!("a certificate key: {e}"))?;
        Ok(Issuing {
            issuer: Issuer::new(params(&self.common_name, &self.hosts), key),
            chain_tail: self.cert_der()?,
            leaf_key,
        })
    }
}

/// Issues a certificate for a name, all with one key made at start.
pub struct Issuing {
    issuer: Issuer<'static, KeyPair>,
    chain_tail: CertificateDer<'static>,
    leaf_key: KeyPair,
}

impl Issuing {
    /// A certificate for `name` (server authentication), with the chain
    /// up to the authority, and its key.
    pub fn issue(
        &self,
        name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), rcgen::Error> {
        let mut p = CertificateParams::new(vec![name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&self.leaf_key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        Ok((vec![cert.der().clone(), self.chain_tail.clone()], key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    fn verify(auth: &Authority, chain: &[CertificateDer<'static>], name: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(auth.cert_der().unwrap()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let server = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &server, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn issued_certificates_verify_for_their_name_only() {
        let hosts = vec!["api.example.com".to_string(), "*.example.org".to_string()];
        let auth = Authority::make("box", &hosts).unwrap();
        let issuing = auth.issuing().unwrap();
        let (chain, _) = issuing.issue("api.example.com").unwrap();
        assert!(verify(&auth, &chain, "api.example.com"));
        assert!(!verify(&auth, &chain, "www.example.com"));
        let (chain, _) = issuing.issue("git.example.org").unwrap();
        assert!(verify(&auth, &chain, "git.example.org"));
    }

    #[test]
    fn name_constraints_bound_what_the_key_can_sign() {
        // Even a certificate the authority's own key signs for a name
        // outside its hosts is refused by a verifying client.
        let auth = Authority::make("box", &["api.example.com".to_string()]).unwrap();
        let issuing = auth.issuing().unwrap();
        let (chain, _) = issuing.issue("bank.example.net").unwrap();
        assert!(!verify(&auth, &chain, "bank.example.net"));
    }

    #[test]
    fn the_issuer_rebuilt_from_storage_signs_what_the_stored_certificate_verifies() {
        let auth = Authority::make("box", &["*.example.com".to_string()]).unwrap();
        let stored: Authority =
            serde_json::from_str(&serde_json::to_string(&auth).unwrap()).unwrap();
        let (chain, _) = stored.issuing().unwrap().issue("a.example.com").unwrap();
        assert!(verify(&auth, &chain, "a.example.com"));
        assert!(!format!("{stored:?}").contains("PRIVATE"));
    }
}
