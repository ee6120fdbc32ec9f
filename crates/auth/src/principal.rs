//! Who a request comes from, and what it may do: roles and identifier scopes.
//!
//! Four roles, each a set of operations (no hierarchy beyond `admin`, which holds them all):
//!
//! | role | may |
//! |---|---|
//! | `executor` | run code and use files in sessions, get and delete a session by identifier, read a pool's metadata |
//! | `contributor` | manage pools, list sessions, read session events, delete any session; everything `reader` may |
//! | `reader` | read metrics and the dashboard |
//! | `admin` | everything |
//!
//! A token may also be scoped to one identifier (or an identifier prefix): it then works only
//! for requests that name a matching identifier.

use std::fmt;
use std::str::FromStr;

/// A role a token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Executor,
    Contributor,
    Reader,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Executor, Role::Contributor, Role::Reader, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Executor => "executor",
            Role::Contributor => "contributor",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }

    /// True when a holder of `self` may do what needs `needed`.
    pub fn grants(self, needed: Role) -> bool {
        self == needed || self == Role::Admin || (self == Role::Contributor && needed == Role::Reader)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    /// Role names are case-insensitive.
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown role '{s}'; the roles are {}", Role::ALL.map(Role::as_str).join(", ")))
    }
}

/// Which identifiers a token may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentifierScope {
    Any,
    Exactly(String),
    StartingWith(String),
}

impl IdentifierScope {
    fn allows(&self, identifier: Option<&str>) -> bool {
        match (self, identifier) {
            (IdentifierScope::Any, _) => true,
            (IdentifierScope::Exactly(scope), Some(id)) => id == scope,
            (IdentifierScope::StartingWith(prefix), Some(id)) => id.starts_with(prefix.as_str()),
            (_, None) => false,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Who: the token's issuer and subject, or `api-key:<name>`.
    pub issuer: String,
    pub subject: String,
    pub roles: Vec<Role>,
    pub scope: IdentifierScope,
}

/// Why an authenticated caller may not do something (HTTP 403). Messages are safe to return.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Forbidden {
    #[error("this operation needs the '{needed}' role; the token carries {held}")]
    MissingRole { needed: Role, held: String },
    #[error("this token is scoped to {scope} and cannot be used for {target}")]
    OutOfScope { scope: String, target: String },
}

impl Principal {
    /// Checks that the caller holds `needed` and, for a scoped token, that the request names
    /// an identifier inside its scope (`identifier` is `None` for requests that name none).
    pub fn authorize(&self, needed: Role, identifier: Option<&str>) -> Result<(), Forbidden> {
        if !self.roles.iter().any(|role| role.grants(needed)) {
            let held = if self.roles.is_empty() {
                "no sandpool role".to_owned()
            } else {
                format!("only {}", self.roles.iter().map(|r| format!("'{r}'")).collect::<Vec<_>>().join(", "))
            };
            return Err(Forbidden::MissingRole { needed, held });
        }
        if !self.scope.allows(identifier) {
            let scope = match &self.scope {
                IdentifierScope::Exactly(id) => format!("the identifier '{id}'"),
                IdentifierScope::StartingWith(prefix) => format!("identifiers starting with '{prefix}'"),
                IdentifierScope::Any => unreachable!("an unscoped token allows every identifier"),
            };
            let target = match identifier {
                Some(_) => "another identifier".to_owned(),
                None => "requests that name no identifier".to_owned(),
            };
            return Err(Forbidden::OutOfScope { scope, target });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(roles: &[Role], scope: IdentifierScope) -> Principal {
        Principal { issuer: "test".into(), subject: "s".into(), roles: roles.to_vec(), scope }
    }

    #[test]
    fn roles_grant_their_own_operations_and_admin_grants_all() {
        let executor = principal(&[Role::Executor], IdentifierScope::Any);
        assert!(executor.authorize(Role::Executor, Some("a")).is_ok());
        assert!(matches!(executor.authorize(Role::Contributor, None), Err(Forbidden::MissingRole { needed: Role::Contributor, .. })));
        assert!(executor.authorize(Role::Reader, None).is_err());
        let contributor = principal(&[Role::Contributor], IdentifierScope::Any);
        assert!(contributor.authorize(Role::Reader, None).is_ok());
        assert!(contributor.authorize(Role::Executor, Some("a")).is_err());
        let admin = principal(&[Role::Admin], IdentifierScope::Any);
        assert!(Role::ALL.iter().all(|&role| admin.authorize(role, None).is_ok()));
        let nobody = principal(&[], IdentifierScope::Any);
        assert_eq!(
            nobody.authorize(Role::Reader, None).unwrap_err().to_string(),
            "this operation needs the 'reader' role; the token carries no sandpool role"
        );
    }

    #[test]
    fn scoped_tokens_work_only_for_their_identifiers() {
        let exact = principal(&[Role::Executor], IdentifierScope::Exactly("user-1".into()));
        assert!(exact.authorize(Role::Executor, Some("user-1")).is_ok());
        assert!(matches!(exact.authorize(Role::Executor, Some("user-12")), Err(Forbidden::OutOfScope { .. })));
        assert!(exact.authorize(Role::Executor, None).is_err());
        let prefix = principal(&[Role::Executor], IdentifierScope::StartingWith("tenant-a-".into()));
        assert!(prefix.authorize(Role::Executor, Some("tenant-a-42")).is_ok());
        assert!(prefix.authorize(Role::Executor, Some("tenant-b-42")).is_err());
    }

    #[test]
    fn role_names_parse_case_insensitively() {
        assert_eq!("Executor".parse::<Role>(), Ok(Role::Executor));
        assert_eq!(" admin ".parse::<Role>(), Ok(Role::Admin));
        assert!("owner".parse::<Role>().unwrap_err().contains("executor, contributor, reader, admin"));
    }
}
