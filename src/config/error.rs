//! Errors of the Migrantfile reader.

use std::fmt;
use std::path::{Path, PathBuf};

/// A Migrantfile problem. Every variant names the file (or the folder where
/// it was looked for); those about a particular place name its line and
/// field.
///
/// Nearly all of them are configuration errors: [`ConfigError::exit_code`]
/// is [`crate::exit::CONFIG`] (78), 77 for a folder that is not the
/// user's.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config `up` handed the supervisor could not be read back (a
    /// bug, or a descriptor that is not the one `up` made).
    #[error("the config handed down by `up` is unreadable: {0}")]
    HandedDown(String),
    /// The project folder has no `Migrantfile`.
    #[error("no Migrantfile in {}", dir.display())]
    NotFound {
        /// The folder that was searched.
        dir: PathBuf,
    },
    /// The Migrantfile exists but could not be read (permissions, not
    /// UTF-8, ...).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The Migrantfile.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The project folder is controlled by another user, who could swap
    /// what migrant reads or runs there.
    #[error(
        "{} is controlled by uid {owner} (the owner of it or of a folder on its path), not by you: \
         whoever controls it chooses what migrant reads and runs there; run migrant as that user",
        dir.display()
    )]
    Foreign {
        /// The project folder.
        dir: PathBuf,
        /// The uid that controls it.
        owner: u32,
    },
    /// The content is wrong. Rendered as `<file>:<line>: <field>: <message>`;
    /// when the problem is not tied to a line (a required field is missing)
    /// `line` is 0 and the `:<line>` part is left out.
    #[error("{}", render_invalid(file, *line, field, message))]
    Invalid {
        /// The Migrantfile.
        file: PathBuf,
        /// 1-based line number; 0 when the problem concerns the whole file.
        line: usize,
        /// The setting concerned, as written in the file (`memory`,
        /// `share[1].tag`, `RAM_MB`, `HOST_ACCESS[0]`, ...).
        field: String,
        /// What is wrong, and when useful, how to fix it.
        message: String,
    },
}

fn render_invalid(file: &Path, line: usize, field: &str, message: &str) -> String {
    let mut out = file.display().to_string();
    if line > 0 {
        out.push_str(&format!(":{line}"));
    }
    out.push_str(": ");
    if !field.is_empty() {
        out.push_str(field);
        out.push_str(": ");
    }
    out.push_str(message);
    out
}

impl ConfigError {
    /// Process exit status for this error: always [`crate::exit::CONFIG`].
    pub fn exit_code(&self) -> u8 {
        match self {
            ConfigError::NotFound { .. }
            | ConfigError::Read { .. }
            | ConfigError::Invalid { .. } => crate::exit::CONFIG,
            ConfigError::HandedDown(_) => crate::exit::SOFTWARE,
            ConfigError::Foreign { .. } => crate::exit::NOPERM,
        }
    }

    /// Shorthand for [`ConfigError::Invalid`].
    pub(crate) fn invalid(
        file: &Path,
        line: usize,
        field: impl fmt::Display,
        message: impl fmt::Display,
    ) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            line,
            field: field.to_string(),
            message: message.to_string(),
        }
    }
}
