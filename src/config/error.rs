//! Errors of the Migrantfile reader.

use std::path::PathBuf;

/// A Migrantfile problem. Every variant names the file; those about a
/// particular place name its line and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no Migrantfile in {dir}")]
    NotFound { dir: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {field}: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

impl ConfigError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ConfigError::NotFound { .. } | ConfigError::Invalid { .. } => crate::exit::CONFIG,
            ConfigError::Read { .. } => crate::exit::CONFIG,
        }
    }
}
