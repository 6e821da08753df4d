//! Optional API keys, checked on HTTP (`Authorization: Bearer KEY`) and gRPC (the same
//! `authorization` metadata), with a per-key limit on requests in flight.
//!
//! Keys come from a file (one per line; blank lines and `#` comments ignored) and/or an
//! environment variable (comma-separated). No keys configured: every caller is accepted.
//! A file line may grant a key more after whitespace: `KEY priority` lets that key set
//! request priorities (other keys' requests run at priority 0 or are refused when they ask
//! for another).
//! Invariant: a generation holds its key's permit from admission until its stream ends, so
//! a key never has more than `per_key` generations in flight.

use crate::api::ApiError;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("API keys file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("no API key in {0} (an empty key list would lock every caller out)")]
    Empty(String),
    #[error("API keys file {path}, line {line}: unknown grant {grant:?} (known: priority)")]
    Grant {
        path: std::path::PathBuf,
        line: usize,
        grant: String,
    },
}

pub struct ApiKeys {
    keys: HashMap<String, Arc<Semaphore>>,
    /// Keys allowed to set request priorities.
    prioritize: std::collections::HashSet<String>,
    per_key: usize,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        write!(
            f,
            "ApiKeys({} keys, {} per key)",
            self.keys.len(),
            self.per_key
        )
    }
}

impl ApiKeys {
    /// Keys from `file` and the comma-separated `env_value`; `None` when neither is given.
    pub fn load(
        file: Option<&std::path::Path>,
        env_value: Option<&str>,
        per_key: usize,
    ) -> Result<Option<Self>, AuthError> {
        if file.is_none() && env_value.is_none() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        let mut prioritize = std::collections::HashSet::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthError::File {
                path: path.to_path_buf(),
                source,
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut words = line.split_whitespace();
                let key = words
                    .next()
                    .expect("a non-empty line has a word")
                    .to_string();
                for grant in words {
                    match grant {
                        "priority" => {
                            prioritize.insert(key.clone());
                        }
                        other => {
                            return Err(AuthError::Grant {
                                path: path.to_path_buf(),
                                line: n + 1,
                                grant: other.to_string(),
                            })
                        }
                    }
                }
                keys.push(key);
            }
        }
        if let Some(v) = env_value {
            keys.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_string),
            );
        }
        if keys.is_empty() {
            return Err(AuthError::Empty(
                file.map_or("the environment".into(), |p| p.display().to_string()),
            ));
        }
        let per_key = if per_key == 0 {
            Semaphore::MAX_PERMITS
        } else {
            per_key
        };
        Ok(Some(ApiKeys {
            keys: keys
                .into_iter()
                .map(|k| (k, Arc::new(Semaphore::new(per_key))))
                .collect(),
            prioritize,
            per_key,
        }))
    }

    /// Whether `key` may set request priorities.
    pub fn may_prioritize(&self, key: &str) -> bool {
        self.prioritize.contains(key)
    }

    /// The key an `authorization` value (`Bearer KEY`) presents, if it is a known one.
    pub fn check(&self, authorization: Option<&str>) -> Result<&str, ApiError> {
        let presented = authorization
            .and_then(|a| {
                a.strip_prefix("Bearer ")
                    .or_else(|| a.strip_prefix("bearer "))
            })
            .map(str::trim);
        match presented {
            None => Err(ApiError::Unauthenticated(
                "missing API key: send `authorization: Bearer KEY`".into(),
            )),
            Some(k) => self
                .keys
                .get_key_value(k)
                .map(|(k, _)| k.as_str())
                .ok_or_else(|| ApiError::Unauthenticated("incorrect API key provided".into())),
        }
    }

    /// A slot of `key`'s concurrency limit, held until dropped; RESOURCE_EXHAUSTED when full.
    pub fn acquire(&self, key: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        let sem = self
            .keys
            .get(key)
            .ok_or_else(|| ApiError::Unauthenticated("incorrect API key provided".into()))?;
        sem.clone().try_acquire_owned().map_err(|_| {
            ApiError::ResourceExhausted(format!(
                "this API key already has {} requests in flight",
                self.per_key
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_env_check_and_limit() {
        let k = ApiKeys::load(None, Some("alpha, beta"), 1)
            .unwrap()
            .unwrap();
        assert_eq!(k.check(Some("Bearer alpha")).unwrap(), "alpha");
        assert!(matches!(
            k.check(Some("Bearer gamma")),
            Err(ApiError::Unauthenticated(_))
        ));
        assert!(matches!(k.check(None), Err(ApiError::Unauthenticated(_))));
        let p = k.acquire("beta").unwrap();
        assert!(matches!(
            k.acquire("beta"),
            Err(ApiError::ResourceExhausted(_))
        ));
        drop(p);
        assert!(k.acquire("beta").is_ok());
        assert!(ApiKeys::load(None, None, 1).unwrap().is_none());
        assert!(!k.may_prioritize("alpha"));
        let dir = std::env::temp_dir().join(format!("sy-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys");
        std::fs::write(&f, "# tenants\nplain\nboss priority\n").unwrap();
        let k = ApiKeys::load(Some(&f), None, 0).unwrap().unwrap();
        assert!(k.may_prioritize("boss") && !k.may_prioritize("plain"));
        assert_eq!(k.check(Some("Bearer boss")).unwrap(), "boss");
        std::fs::write(&f, "x admin\n").unwrap();
        assert!(matches!(
            ApiKeys::load(Some(&f), None, 0),
            Err(AuthError::Grant { line: 1, .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(ApiKeys::load(None, Some(" , "), 1).is_err());
    }
}
