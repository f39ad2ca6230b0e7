//! Who is calling: the verified client certificate's identity, mapped to roles.

use certs::PeerIdentity;

use crate::config::RolesConfig;
/// Identity patterns are parsed with the config (`sso-config`), which ssoctl shares.
pub use sso_config::Pattern;

/// A role, as SPEC §5 defines them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Fetch keys, watch the keyring, health.
    Client,
    /// Everything a client may, plus key administration.
    Admin,
    /// The other node of the pair: replication only.
    Peer,
}

impl Role {
    /// Lowercase name for logs and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Admin => "admin",
            Self::Peer => "peer",
        }
    }
}

/// The role map: the config's patterns, parsed once when the config was read.
#[derive(Clone, Debug, Default)]
pub struct RoleMap {
    roles: RolesConfig,
}

impl RoleMap {
    /// The map of the config's `[roles]`.
    pub fn new(config: &RolesConfig) -> Self {
        Self { roles: config.clone() }
    }

    /// The roles an identity holds.
    pub fn roles(&self, id: &PeerIdentity) -> Roles {
        let any = |ps: &[Pattern]| ps.iter().any(|p| p.matches(id));
        Roles {
            client: any(&self.roles.client),
            admin: any(&self.roles.admin),
            peer: any(&self.roles.peer),
        }
    }
}

/// The set of roles a caller holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// Holds `client`.
    pub client: bool,
    /// Holds `admin`.
    pub admin: bool,
    /// Holds `peer`.
    pub peer: bool,
}

impl Roles {
    /// Whether these roles allow what `needed` allows. Admin includes client.
    pub fn allows(&self, needed: Role) -> bool {
        match needed {
            Role::Client => self.client || self.admin,
            Role::Admin => self.admin,
            Role::Peer => self.peer,
        }
    }

    /// The highest role held, for audit entries.
    pub fn label(&self) -> &'static str {
        if self.admin {
            "admin"
        } else if self.peer {
            "peer"
        } else if self.client {
            "client"
        } else {
            "none"
        }
    }
}

/// A verified caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// What the certificate says.
    pub identity: PeerIdentity,
    /// What the config grants it.
    pub roles: Roles,
    /// Short label for audit and logs; shared by every audit entry of the connection.
    pub label: std::sync::Arc<str>,
    /// Serial and fingerprint of the certificate, for every audit entry of the connection.
    pub cert: std::sync::Arc<crate::audit::CertRef>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cn: &str, dns: &[&str], uris: &[&str]) -> PeerIdentity {
        PeerIdentity {
            common_name: Some(cn.into()),
            dns_names: dns.iter().map(|s| (*s).into()).collect(),
            uris: uris.iter().map(|s| (*s).into()).collect(),
            ..PeerIdentity::default()
        }
    }

    #[test]
    fn patterns_map_identities_to_roles() {
        let p = |text: &str| Pattern::parse(text).unwrap();
        let map = RoleMap::new(&RolesConfig {
            client: vec![p("cn:client"), p("dns:app.example")],
            admin: vec![p("cn:admin")],
            peer: vec![p("uri:spiffe://x/node-b")],
        });
        assert!(map.roles(&id("client", &[], &[])).allows(Role::Client));
        assert!(!map.roles(&id("client", &[], &[])).allows(Role::Admin));
        assert!(map.roles(&id("admin", &[], &[])).allows(Role::Client));
        assert!(map.roles(&id("x", &["APP.example"], &[])).allows(Role::Client));
        let peer = map.roles(&id("node-b", &[], &["spiffe://x/node-b"]));
        assert!(peer.allows(Role::Peer) && !peer.allows(Role::Client));
        assert_eq!(map.roles(&id("stranger", &[], &[])), Roles::default());
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["admin", "cn:", "ip:1.2.3.4"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Pattern::parse("cn:*").unwrap(), Pattern::AnyCn);
    }
}
