//! The original bash tool's Migrantfile, read as data.
//!
//! The original `source`d its Migrantfile; migrant never runs it. It reads
//! this subset of shell syntax and refuses everything else with the file
//! and line:
//!
//! * blank lines and comments: `#` at the start of a word, to the end of
//!   the line (also after a value, and inside multi-line arrays);
//! * `NAME=value`, optionally preceded by `export `; one per line;
//! * values made of unquoted text, `'single quoted'` (literal) and
//!   `"double quoted"` text (escapes `\"`, `\\`, `\$`, `` \` ``), glued
//!   together as the shell does; a backslash-newline continues the line;
//! * arrays `NAME=(word word ...)`, possibly over several lines;
//! * two expansions, both known without running anything: `$HOME` /
//!   `${HOME}` (the invoking user's home) and `$VM_DIR` / `${VM_DIR}` (the
//!   project folder, as the original defined it), plus `~` at the start of
//!   an unquoted word. Any other `$NAME`, `${...}`, `$(...)`, backticks,
//!   `;`, `&`, `|`, redirections, functions, `if`/`for`/..., or any other
//!   command is an error.
//!
//! Unquoted glob and brace characters (`* ? [ { }`) in array elements are
//! refused (the shell would expand them against the file system).
//!
//! How the original's variables map (unknown variables are errors, to
//! catch typos; a variable assigned twice keeps its last value, as in the
//! shell):
//!
//! | variable                  | setting                                            |
//! |---------------------------|----------------------------------------------------|
//! | `VM_NAME`                 | `name` (default: the folder name, as in TOML)      |
//! | `RAM_MB`                  | `memory`, in MiB                                   |
//! | `VCPUS`                   | `cpus`                                             |
//! | `DISK_GB`                 | `disk`, in GiB                                     |
//! | `IMAGE_URL`               | `image`                                            |
//! | `IMAGE_CHECKSUM`          | `image_checksum` (migrant only; not in the original) |
//! | `SHARED_FOLDERS`          | `share`: `"host:tag[:size_gb]"` each               |
//! | `SHARED_FOLDER_SIZE_GB`   | size of shares without `:size_gb` (default 10)     |
//! | `SHARED_FOLDER_ISOLATION` | `isolation` of every share (`true`/`false`)        |
//! | `NETWORKS`                | recorded in `Network::legacy_networks` only        |
//! | `BOOT_FIRMWARE`           | `firmware`: `bios`, `uefi` (or `efi`)              |
//! | `NETWORK_ISOLATION`       | `true`: egress direct; `false`: [`Egress::Open`]   |
//! | `NETWORK_IPV6`            | `ipv6`: `off`/`nat` (or `false`/`true`)            |
//! | `AUTOCONNECT`             | `autoconnect`: empty/`none`, `ssh`, `console`      |
//! | `HOST_ACCESS`             | `network.rules`, same directive syntax             |
//! | `TUNNEL_PORTS`            | `tunnel_ports`                                     |
//! | `SSH_KEY_PATH`            | `ssh.key` (`~/` allowed, empty means default)      |
//! | `CLOUD_INIT_WAIT`         | `wait_cloud_init` (`true`/`false`)                 |
//! | `OS_VARIANT`              | ignored                                            |
//!
//! Paths follow the native rules: relative to the Migrantfile's folder;
//! `~` is expanded where bash expands it (a quoted `~/` in `IMAGE_URL` or
//! `SHARED_FOLDERS` is an error; `SSH_KEY_PATH` expands it, as the
//! original itself does). The original insisted on
//! `VM_NAME`, `RAM_MB`, `VCPUS`, `DISK_GB`, `IMAGE_URL` and `OS_VARIANT`;
//! here only `IMAGE_URL` is required and the rest take the native
//! defaults.
//!
//! Booleans are `true` or `false` exactly (an empty value means the
//! default); the original's loose tests (`!= false`, `== true`) are not
//! reproduced, so a typo is reported instead of silently meaning one or
//! the other.
//!
//! [`Egress::Open`]: super::Egress::Open

use super::draft::{At, Ctx, Draft, DraftShare};
use super::values::{self, GIB, MIB};
use super::{Autoconnect, ConfigError, Egress, Firmware, Format};
use std::collections::HashMap;

/// The variables the original tool read from its Migrantfile.
const KNOWN: [&str; 19] = [
    "VM_NAME",
    "OS_VARIANT",
    "RAM_MB",
    "VCPUS",
    "DISK_GB",
    "IMAGE_URL",
    "IMAGE_CHECKSUM",
    "SHARED_FOLDERS",
    "SHARED_FOLDER_SIZE_GB",
    "SHARED_FOLDER_ISOLATION",
    "NETWORKS",
    "BOOT_FIRMWARE",
    "NETWORK_ISOLATION",
    "NETWORK_IPV6",
    "AUTOCONNECT",
    "HOST_ACCESS",
    "TUNNEL_PORTS",
    "SSH_KEY_PATH",
    "CLOUD_INIT_WAIT",
];

/// Shell words that start commands or compound statements, for a clearer
/// message when one is found.
const SHELL_WORDS: [&str; 30] = [
    "if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac",
    "function", "select", "source", ".", "eval", "exec", "declare", "typeset", "local", "readonly",
    "unset", "set", "shopt", "alias", "echo", "printf", "[[", "[",
];

/// One word of a value, with the line it starts on.
#[derive(Debug, Clone, PartialEq)]
struct Word {
    text: String,
    line: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Scalar(Word),
    Array(Vec<Word>),
}

#[derive(Debug, Clone, PartialEq)]
struct Assignment {
    name: String,
    line: usize,
    value: Value,
}

const DATA_NOTE: &str =
    "the Migrantfile is read as data, not run: only NAME=value assignments are allowed";

/// Read an original-style Migrantfile into a draft.
pub(super) fn read(text: &str, ctx: &Ctx) -> Result<Draft, ConfigError> {
    let assignments = Lexer::new(text, ctx).assignments()?;
    apply(assignments, ctx)
}

/// [`read`], and where each assignment stands (first and last line, in
/// file order) for `convert` to carry the comments around it.
pub(super) fn read_with_spans(
    text: &str,
    ctx: &Ctx,
) -> Result<(Draft, Vec<super::draft::Span>), ConfigError> {
    let assignments = Lexer::new(text, ctx).assignments()?;
    let spans = assignments
        .iter()
        .map(|a| {
            let last = match &a.value {
                Value::Scalar(w) => w.line,
                Value::Array(ws) => ws.iter().map(|w| w.line).max().unwrap_or(a.line),
            };
            super::draft::Span {
                name: a.name.clone(),
                first: a.line,
                last: last.max(a.line),
            }
        })
        .collect();
    Ok((apply(assignments, ctx)?, spans))
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    ctx: &'a Ctx,
}

/// Where a word is being read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Scalar,
    Array,
}

impl<'a> Lexer<'a> {
    fn new(text: &str, ctx: &'a Ctx) -> Self {
        Lexer {
            chars: text.chars().collect(),
            pos: 0,
            line: 1,
            ctx,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.pos + n).copied()
    }

    /// Consume one character, counting lines.
    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn err(&self, line: usize, field: &str, message: impl std::fmt::Display) -> ConfigError {
        self.ctx.err(line, field, message)
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t' | '\r')) {
            self.bump();
        }
    }

    fn skip_comment(&mut self) {
        while let Some(c) = self.peek() {
            if c == '\n' {
                break;
            }
            self.bump();
        }
    }

    /// The rest of the current line, for messages.
    fn rest_of_line(&self) -> String {
        self.chars[self.pos..]
            .iter()
            .take_while(|c| **c != '\n')
            .collect::<String>()
            .trim()
            .to_string()
    }

    fn assignments(mut self) -> Result<Vec<Assignment>, ConfigError> {
        let mut out = Vec::new();
        loop {
            self.skip_blanks();
            match self.peek() {
                None => break,
                Some('\n') => {
                    self.bump();
                    continue;
                }
                Some('#') => {
                    self.skip_comment();
                    continue;
                }
                Some(_) => {}
            }
            out.push(self.assignment()?);
            self.end_of_statement(out.last().map_or("", |a| a.name.as_str()))?;
        }
        Ok(out)
    }

    fn identifier(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            let ok = if name.is_empty() {
                c.is_ascii_alphabetic() || c == '_'
            } else {
                c.is_ascii_alphanumeric() || c == '_'
            };
            if !ok {
                break;
            }
            name.push(c);
            self.bump();
        }
        name
    }

    fn assignment(&mut self) -> Result<Assignment, ConfigError> {
        let line = self.line;
        let start = self.pos;
        let mut name = self.identifier();
        if name == "export" && matches!(self.peek(), Some(' ' | '\t')) {
            self.skip_blanks();
            name = self.identifier();
            if name.is_empty() {
                return Err(self.err(
                    line,
                    "export",
                    format!("unsupported: {:?}; {DATA_NOTE}", self.rest_of_line()),
                ));
            }
        }
        if self.peek() != Some('=') {
            return Err(self.unsupported_statement(line, start, &name));
        }
        self.bump();
        let value = if self.peek() == Some('(') {
            self.bump();
            Value::Array(self.array(line, &name)?)
        } else {
            Value::Scalar(self.word(Place::Scalar, &name)?.unwrap_or(Word {
                text: String::new(),
                line,
            }))
        };
        Ok(Assignment { name, line, value })
    }

    /// Explain why the statement at `start` is not an assignment.
    fn unsupported_statement(&mut self, line: usize, start: usize, name: &str) -> ConfigError {
        let text: String = self.chars[start..]
            .iter()
            .take_while(|c| **c != '\n')
            .collect::<String>()
            .trim()
            .to_string();
        let first_word: String = text
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != ';')
            .collect();
        let next = self.peek();
        if !name.is_empty() && next == Some('+') && self.peek_at(1) == Some('=') {
            return self.err(
                line,
                name,
                "appending with += is not supported; assign the whole value",
            );
        }
        if !name.is_empty() && next == Some('[') {
            return self.err(
                line,
                name,
                "assigning one array element (NAME[i]=...) is not supported; assign the whole array",
            );
        }
        if !name.is_empty() && next == Some('(') {
            return self.err(
                line,
                "syntax",
                format!("function definitions are not supported ({name}); {DATA_NOTE}"),
            );
        }
        if !name.is_empty() && matches!(next, Some(' ' | '\t')) && {
            let mut i = self.pos;
            while matches!(self.chars.get(i), Some(' ' | '\t')) {
                i += 1;
            }
            self.chars.get(i) == Some(&'=')
        } {
            return self.err(line, name, "no blanks are allowed around '=' in NAME=value");
        }
        if SHELL_WORDS.contains(&first_word.as_str()) {
            return self.err(
                line,
                "syntax",
                format!("shell statement {first_word:?} is not supported; {DATA_NOTE}"),
            );
        }
        self.err(
            line,
            "syntax",
            format!("{text:?} is a command; {DATA_NOTE}"),
        )
    }

    /// After a value: blanks, an optional comment, then the end of the line.
    fn end_of_statement(&mut self, name: &str) -> Result<(), ConfigError> {
        self.skip_blanks();
        match self.peek() {
            None | Some('\n') => Ok(()),
            Some('#') => {
                self.skip_comment();
                Ok(())
            }
            Some(';') => Err(self.err(
                self.line,
                name,
                format!("';' is not supported: write one assignment per line; {DATA_NOTE}"),
            )),
            Some(c @ ('&' | '|' | '<' | '>')) => Err(self.err(
                self.line,
                name,
                format!("operator '{c}' is not supported; {DATA_NOTE}"),
            )),
            Some(_) => Err(self.err(
                self.line,
                name,
                format!(
                    "unexpected {:?} after the value (the shell would run it as a command); \
                     quote values that contain blanks",
                    self.rest_of_line()
                ),
            )),
        }
    }

    fn array(&mut self, open_line: usize, name: &str) -> Result<Vec<Word>, ConfigError> {
        let mut words = Vec::new();
        loop {
            while matches!(self.peek(), Some(' ' | '\t' | '\r' | '\n')) {
                self.bump();
            }
            match self.peek() {
                None => {
                    return Err(self.err(
                        open_line,
                        name,
                        format!(
                            "unterminated array: the '(' on line {open_line} has no matching ')'"
                        ),
                    ));
                }
                Some(')') => {
                    self.bump();
                    return Ok(words);
                }
                Some('#') => self.skip_comment(),
                Some('(') => {
                    return Err(self.err(
                        self.line,
                        name,
                        format!(
                            "unexpected '(' inside the array opened on line {open_line}; is its ')' missing?"
                        ),
                    ));
                }
                Some(_) => {
                    let line = self.line;
                    if self.looks_like_assignment() {
                        return Err(self.err(
                            line,
                            name,
                            format!(
                                "an assignment inside the array opened on line {open_line}; is its ')' missing?"
                            ),
                        ));
                    }
                    if let Some(w) = self.word(Place::Array, name)? {
                        words.push(w);
                    }
                }
            }
        }
    }

    /// Whether the text at the cursor is an unquoted `UPPER_NAME=`.
    fn looks_like_assignment(&self) -> bool {
        let mut i = self.pos;
        let mut len = 0;
        while let Some(c) = self.chars.get(i) {
            if c.is_ascii_uppercase() || *c == '_' || (len > 0 && c.is_ascii_digit()) {
                len += 1;
                i += 1;
            } else {
                break;
            }
        }
        len > 0 && self.chars.get(i) == Some(&'=')
    }

    /// Read one shell word (quotes and escapes removed, allowed expansions
    /// done). `None` when nothing was there (end of the value).
    fn word(&mut self, place: Place, name: &str) -> Result<Option<Word>, ConfigError> {
        let line = self.line;
        let mut text = String::new();
        let mut started = false;
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' | '\r' | '\n' => break,
                ')' if place == Place::Array => break,
                '#' if !started && place == Place::Array => break,
                ';' | '&' | '|' | '<' | '>' => {
                    if place == Place::Scalar {
                        break; // reported by end_of_statement
                    }
                    return Err(self.err(
                        self.line,
                        name,
                        format!("operator '{c}' is not supported; {DATA_NOTE}"),
                    ));
                }
                '(' | ')' => {
                    return Err(self.err(
                        self.line,
                        name,
                        format!("unexpected '{c}': quote values containing parentheses"),
                    ));
                }
                '`' => return Err(self.command_substitution(name)),
                '*' | '?' | '[' | ']' | '{' | '}' if place == Place::Array => {
                    return Err(self.err(
                        self.line,
                        name,
                        format!(
                            "unquoted '{c}' in an array element would be expanded by the shell; quote the element"
                        ),
                    ));
                }
                '~' if !started
                    && matches!(
                        self.peek_at(1),
                        None | Some('/' | ' ' | '\t' | '\r' | '\n' | ')')
                    ) =>
                {
                    self.bump();
                    text.push_str(&self.home(name)?);
                }
                '\\' if self.peek_at(1) == Some('\n') => {
                    // Line continuation: removed, not part of the word.
                    self.bump();
                    self.bump();
                    continue;
                }
                '\\' => {
                    self.bump();
                    match self.bump() {
                        Some(escaped) => text.push(escaped),
                        None => {
                            return Err(self.err(self.line, name, "a backslash ends the file"));
                        }
                    }
                }
                '\'' => {
                    let open = self.line;
                    self.bump();
                    loop {
                        match self.bump() {
                            Some('\'') => break,
                            Some(ch) => text.push(ch),
                            None => {
                                return Err(self.err(
                                    open,
                                    name,
                                    format!("unterminated single quote: the ' on line {open} is never closed"),
                                ));
                            }
                        }
                    }
                }
                '"' => {
                    self.bump();
                    self.double_quoted(&mut text, name)?;
                }
                '$' => {
                    self.bump();
                    self.dollar(&mut text, name, false)?;
                }
                _ => {
                    self.bump();
                    text.push(c);
                }
            }
            started = true;
        }
        Ok(started.then_some(Word { text, line }))
    }

    /// The inside of `"..."`; the opening quote is consumed.
    fn double_quoted(&mut self, text: &mut String, name: &str) -> Result<(), ConfigError> {
        let open = self.line;
        loop {
            match self.bump() {
                Some('"') => return Ok(()),
                Some('\\') => match self.bump() {
                    Some('\n') => {}
                    Some(c @ ('"' | '\\' | '$' | '`')) => text.push(c),
                    Some(c) => {
                        text.push('\\');
                        text.push(c);
                    }
                    None => break,
                },
                Some('$') => self.dollar(text, name, true)?,
                Some('`') => return Err(self.command_substitution(name)),
                Some(c) => text.push(c),
                None => break,
            }
        }
        Err(self.err(
            open,
            name,
            format!("unterminated double quote: the \" on line {open} is never closed"),
        ))
    }

    /// At a `$(` or a backtick: the command it would run, named with what
    /// to write in its place.
    fn command_substitution(&self, name: &str) -> ConfigError {
        let rest: String = self.chars[self.pos..]
            .iter()
            .take_while(|c| **c != '\n')
            .collect();
        let rest = rest.trim_end();
        let command = rest.trim_start_matches(['$', '(', '`']).trim_start();
        let instead = if command.starts_with("realpath") || command.starts_with("readlink") {
            "write the path itself (relative paths are relative to the Migrantfile's folder; \"$VM_DIR/...\" works too)"
        } else if command.starts_with("ip ") {
            "write the address itself (for example allow-lan-host 192.168.1.1)"
        } else {
            "write the value it prints in its place"
        };
        self.err(
            self.line,
            name,
            format!(
                "command substitution {rest} is not supported: the Migrantfile is read as data, never run; {instead}"
            ),
        )
    }

    fn home(&self, name: &str) -> Result<String, ConfigError> {
        match &self.ctx.home {
            Some(h) => Ok(h.to_string_lossy().into_owned()),
            None => Err(self.err(
                self.line,
                name,
                "cannot expand the home folder: the invoking user's home is unknown (HOME is not set)",
            )),
        }
    }

    /// After a `$` (consumed): an allowed expansion, a literal `$`, or an
    /// error.
    fn dollar(&mut self, text: &mut String, name: &str, quoted: bool) -> Result<(), ConfigError> {
        let line = self.line;
        let var = match self.peek() {
            Some('(') => {
                if self.peek_at(1) == Some('(') {
                    return Err(self.err(
                        line,
                        name,
                        format!("arithmetic expansion $((...)) is not supported; {DATA_NOTE}"),
                    ));
                }
                return Err(self.command_substitution(name));
            }
            Some('{') => {
                self.bump();
                let mut inner = String::new();
                loop {
                    match self.bump() {
                        Some('}') => break,
                        Some('\n') | None => {
                            return Err(self.err(line, name, "unterminated ${...}"));
                        }
                        Some(c) => inner.push(c),
                    }
                }
                let is_name = inner.chars().enumerate().all(|(i, c)| {
                    c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
                }) && !inner.is_empty();
                if !is_name {
                    return Err(self.err(
                        line,
                        name,
                        format!("parameter expansion ${{{inner}}} is not supported; {DATA_NOTE}"),
                    ));
                }
                inner
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => self.identifier(),
            Some(c) if c.is_ascii_digit() || "@*#?-$!".contains(c) => {
                return Err(self.err(
                    line,
                    name,
                    format!("special parameter ${c} is not supported; {DATA_NOTE}"),
                ));
            }
            Some(c @ ('\'' | '"')) if !quoted => {
                return Err(self.err(
                    line,
                    name,
                    format!("${c}...{c} quoting is not supported; use plain quotes"),
                ));
            }
            _ => {
                text.push('$');
                return Ok(());
            }
        };
        match var.as_str() {
            "HOME" => text.push_str(&self.home(name)?),
            "VM_DIR" => text.push_str(&self.ctx.dir.to_string_lossy()),
            _ => {
                return Err(self.err(
                    line,
                    name,
                    format!(
                        "variable expansion ${var} is not supported (only $HOME and $VM_DIR are); {DATA_NOTE}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Last assignment of each variable, in a form convenient for mapping.
struct Vars {
    by_name: HashMap<String, Assignment>,
}

impl Vars {
    fn get(&self, name: &str) -> Option<&Assignment> {
        self.by_name.get(name)
    }

    /// A single-valued variable: its word. Arrays are refused.
    fn scalar(&self, name: &str, ctx: &Ctx) -> Result<Option<At<String>>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Assignment {
                value: Value::Scalar(w),
                ..
            }) => Ok(Some(At::new(w.text.clone(), w.line, name))),
            Some(a) => Err(ctx.err(a.line, name, "expects a single value, not an array (...)")),
        }
    }

    /// A list variable; a plain value counts as a one-element list, as in
    /// the shell. Each word's field is `NAME[i]`.
    fn array(&self, name: &str) -> Vec<At<String>> {
        match self.get(name) {
            None => Vec::new(),
            Some(a) => {
                let words = match &a.value {
                    Value::Scalar(w) => std::slice::from_ref(w),
                    Value::Array(ws) => ws.as_slice(),
                };
                words
                    .iter()
                    .enumerate()
                    .map(|(i, w)| At::new(w.text.clone(), w.line, format!("{name}[{i}]")))
                    .collect()
            }
        }
    }

    /// `true`/`false`; empty or unset means `default`.
    fn boolean(&self, name: &str, default: bool, ctx: &Ctx) -> Result<At<bool>, ConfigError> {
        let Some(at) = self.scalar(name, ctx)? else {
            return Ok(At::new(default, 0, name));
        };
        let value = match at.value.as_str() {
            "" => default,
            "true" => true,
            "false" => false,
            other => {
                return Err(ctx.err_at(&at, format!("{other:?} should be true or false")));
            }
        };
        Ok(At::new(value, at.line, name))
    }

    /// A whole number; `unit` names it in messages.
    fn number(&self, name: &str, unit: &str, ctx: &Ctx) -> Result<Option<At<u64>>, ConfigError> {
        let Some(at) = self.scalar(name, ctx)? else {
            return Ok(None);
        };
        let n = values::parse_decimal(&at.value).ok_or_else(|| {
            ctx.err_at(
                &at,
                format!("{:?} should be a whole number of {unit}", at.value),
            )
        })?;
        Ok(Some(At::new(n, at.line, name)))
    }

    /// A whole number of `factor`-byte units, as bytes.
    fn bytes(
        &self,
        name: &str,
        unit: &str,
        factor: u64,
        ctx: &Ctx,
    ) -> Result<Option<At<u64>>, ConfigError> {
        let Some(at) = self.number(name, unit, ctx)? else {
            return Ok(None);
        };
        if at.value == 0 {
            return Err(ctx.err_at(&at, "must not be zero"));
        }
        let bytes = at
            .value
            .checked_mul(factor)
            .ok_or_else(|| ctx.err_at(&at, format!("{} {unit} is too large", at.value)))?;
        Ok(Some(At::new(bytes, at.line, name)))
    }
}

fn apply(assignments: Vec<Assignment>, ctx: &Ctx) -> Result<Draft, ConfigError> {
    let mut by_name = HashMap::new();
    for a in assignments {
        if !KNOWN.contains(&a.name.as_str()) {
            return Err(ctx.err(
                a.line,
                &a.name,
                format!(
                    "unknown variable {}; the Migrantfile may set: {}",
                    a.name,
                    KNOWN.join(", ")
                ),
            ));
        }
        by_name.insert(a.name.clone(), a);
    }
    let vars = Vars { by_name };
    let mut d = Draft::new(Format::Legacy);

    d.name = vars.scalar("VM_NAME", ctx)?;
    d.image = vars.scalar("IMAGE_URL", ctx)?;
    if let Some(at) = &d.image {
        unexpanded_tilde(at, &at.value, ctx)?;
    }
    d.image_checksum = vars
        .scalar("IMAGE_CHECKSUM", ctx)?
        .filter(|at| !at.value.is_empty());
    d.memory = vars.bytes("RAM_MB", "megabytes (MiB)", MIB, ctx)?;
    d.disk = vars.bytes("DISK_GB", "gigabytes (GiB)", GIB, ctx)?;
    d.cpus = vars.number("VCPUS", "CPUs", ctx)?.map(|at| {
        At::new(
            i64::try_from(at.value).unwrap_or(i64::MAX),
            at.line,
            at.field,
        )
    });
    d.share_default_size = vars.bytes("SHARED_FOLDER_SIZE_GB", "gigabytes (GiB)", GIB, ctx)?;

    let isolation = vars.boolean("SHARED_FOLDER_ISOLATION", true, ctx)?.value;
    for entry in vars.array("SHARED_FOLDERS") {
        d.shares.push(shared_folder(&entry, isolation, ctx)?);
    }

    d.legacy_networks = vars
        .array("NETWORKS")
        .into_iter()
        .map(|at| at.value)
        .collect();
    if let Some(a) = vars.get("NETWORKS")
        && d.legacy_networks != ["network=migrant"]
    {
        d.warnings.push(format!(
            "{}:{}: NETWORKS is recorded but not used: migrant gives the VM one network card on its own isolated network",
            ctx.file.display(),
            a.line
        ));
    }

    if let Some(at) = vars.scalar("BOOT_FIRMWARE", ctx)? {
        d.firmware = match at.value.as_str() {
            "" | "bios" => Firmware::Bios,
            "uefi" | "efi" => Firmware::Uefi,
            other => return Err(ctx.err_at(&at, format!("{other:?} should be bios or uefi"))),
        };
    }

    let isolated = vars.boolean("NETWORK_ISOLATION", true, ctx)?;
    d.egress = if isolated.value {
        Egress::Direct
    } else {
        Egress::Open
    };

    if let Some(at) = vars.scalar("NETWORK_IPV6", ctx)? {
        let on = match at.value.as_str() {
            "" | "off" | "false" => false,
            "nat" | "true" => true,
            other => return Err(ctx.err_at(&at, format!("{other:?} should be off or nat"))),
        };
        d.ipv6 = Some(At::new(on, at.line, at.field));
    }

    if let Some(at) = vars.scalar("AUTOCONNECT", ctx)? {
        d.autoconnect = match at.value.as_str() {
            "" | "none" => Autoconnect::None,
            "ssh" => Autoconnect::Ssh,
            "console" => Autoconnect::Console,
            other => {
                return Err(ctx.err_at(&at, format!("{other:?} should be ssh, console or empty")));
            }
        };
    }

    d.rules = vars.array("HOST_ACCESS");
    if !isolated.value && !d.rules.is_empty() {
        d.warnings.push(format!(
            "{}:{}: HOST_ACCESS had no effect in the original tool with NETWORK_ISOLATION=false; migrant keeps the rules",
            ctx.file.display(),
            isolated.line
        ));
    }

    for at in vars.array("TUNNEL_PORTS") {
        let port = values::parse_decimal(&at.value)
            .and_then(|p| i64::try_from(p).ok())
            .ok_or_else(|| {
                ctx.err_at(
                    &at,
                    format!("port {:?} should be a number from 1 to 65535", at.value),
                )
            })?;
        d.tunnel_ports.push(At::new(port, at.line, at.field));
    }

    d.ssh_key = vars
        .scalar("SSH_KEY_PATH", ctx)?
        .filter(|at| !at.value.is_empty());
    d.wait_cloud_init = vars.boolean("CLOUD_INIT_WAIT", true, ctx)?.value;
    Ok(d)
}

/// A path that still starts with `~/` after the shell rules: its `~` was
/// quoted or escaped, which bash leaves alone, so the original tool would
/// have used a folder literally named `~`. Said rather than guessed at.
/// (`SSH_KEY_PATH` is not checked: the original expands its `~` itself.)
fn unexpanded_tilde(at: &At<String>, path: &str, ctx: &Ctx) -> Result<(), ConfigError> {
    if path == "~" || path.starts_with("~/") {
        return Err(ctx.err_at(
            at,
            format!(
                "{path:?}: this ~ is quoted, and bash (like the original tool) does not expand a quoted ~; write it unquoted at the start of the value ({}=~/...), or give the full path",
                at.field
            ),
        ));
    }
    Ok(())
}

/// `"host:tag[:size_gb]"`. As in the original, an entry without `:` uses
/// the same text for host and tag, and an empty size means "default".
fn shared_folder(
    entry: &At<String>,
    isolation: bool,
    ctx: &Ctx,
) -> Result<DraftShare, ConfigError> {
    let text = entry.value.as_str();
    let (host, rest) = text.split_once(':').unwrap_or((text, text));
    let (tag, size) = match rest.split_once(':') {
        Some((tag, size)) => (tag, Some(size)),
        None => (rest, None),
    };
    let bad = |why: &str| {
        ctx.err_at(
            entry,
            format!("{text:?}: {why}; the format is \"host_path:tag[:size_gb]\""),
        )
    };
    if host.is_empty() {
        return Err(bad("the host path is empty"));
    }
    unexpanded_tilde(entry, host, ctx)?;
    if tag.is_empty() {
        return Err(bad("the tag is empty"));
    }
    let size = match size.filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            let gb = values::parse_decimal(s)
                .filter(|n| *n > 0)
                .ok_or_else(|| bad("the size should be a whole number of gigabytes"))?;
            let bytes = gb
                .checked_mul(GIB)
                .ok_or_else(|| bad("the size is too large"))?;
            Some(At::new(bytes, entry.line, &entry.field))
        }
    };
    Ok(DraftShare {
        at: At::new((), entry.line, &entry.field),
        host: At::new(host.to_string(), entry.line, &entry.field),
        tag: Some(At::new(tag.to_string(), entry.line, &entry.field)),
        guest: None,
        size,
        isolation,
        isolation_field: "SHARED_FOLDER_ISOLATION".to_string(),
    })
}
