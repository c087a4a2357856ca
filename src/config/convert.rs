//! `migrant convert`: an original-style (bash) Migrantfile rewritten in
//! TOML, with its comments.
//!
//! The file is first read exactly as `up` reads it, so anything that is
//! not data (`$(…)`, other variables, commands) stops the conversion with
//! the file, line and what to write instead, and nothing is written. The
//! TOML is then made from what the file said (not from defaults), each
//! setting under the comments that stood above its assignment, inline
//! comments kept beside it. Settings of the original that migrant does not
//! use (`OS_VARIANT`, `NETWORKS`) become comments that say so. Last, the TOML is read back and must give the same
//! configuration as the original file; otherwise nothing is written.

use std::path::{Path, PathBuf};

use super::draft::{At, Ctx, Draft, Span};
use super::values::{GIB, MIB};
use super::{Autoconnect, Config, ConfigError, Egress, Firmware, Format};

/// Where a converted setting goes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Section {
    Top,
    Share,
    Network,
    Ssh,
}

/// The TOML for the bash-style Migrantfile in `dir`.
pub(super) fn convert(dir: &Path, home: Option<PathBuf>) -> Result<String, ConfigError> {
    let ctx = Ctx::new(dir, home);
    let text = super::parse::read(&ctx)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if super::Format::detect(text).ok() != Some(Format::Legacy) {
        return Err(ctx.err(
            0,
            "format",
            "is not an original-style (NAME=value) Migrantfile; there is nothing to convert",
        ));
    }
    // Everything `up` would refuse is refused here, with its line.
    let (draft, spans) = super::legacy::read_with_spans(text, &ctx)?;
    let before = super::parse::finish(draft.clone(), &ctx)?;
    let toml = render(text, &spans, &draft, &before, &ctx);
    let after = super::parse::parse_text(&toml, &ctx).map_err(|e| {
        ctx.err(
            0,
            "format",
            format!("the converted file does not read back ({e}); nothing was written:\n{toml}"),
        )
    })?;
    if !same(&before, &after) {
        return Err(ctx.err(
            0,
            "format",
            format!(
                "the converted file would configure another VM; nothing was written.\n--- original: {before:?}\n--- converted: {after:?}"
            ),
        ));
    }
    Ok(toml)
}

/// The two configurations are the same VM (format, warnings and the
/// ignored `NETWORKS` aside).
fn same(a: &Config, b: &Config) -> bool {
    let norm = |c: &Config| {
        let mut c = c.clone();
        c.format = Format::Toml;
        c.warnings.clear();
        c.network.legacy_networks.clear();
        c
    };
    norm(a) == norm(b)
}

fn render(text: &str, spans: &[Span], d: &Draft, cfg: &Config, ctx: &Ctx) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_comment = |n: usize| {
        lines
            .get(n - 1)
            .is_some_and(|l| l.trim_start().starts_with('#'))
    };
    let is_blank = |n: usize| lines.get(n - 1).is_some_and(|l| l.trim().is_empty());
    // Each assignment takes the comment lines between the previous one and
    // itself (blank lines between comment blocks kept as one blank line),
    // and those inside its own span (multi-line arrays).
    let mut blocks: Vec<(Section, String)> = Vec::new();
    let mut prev_end = 0;
    for span in spans {
        let mut above = String::new();
        let mut gap = false;
        for n in prev_end + 1..span.first {
            if is_comment(n) {
                if gap && !above.is_empty() {
                    above.push('\n');
                }
                gap = false;
                above.push_str(lines[n - 1].trim_start());
                above.push('\n');
            } else if is_blank(n) {
                gap = true;
            }
        }
        // Inside a multi-line value: comment lines, and comments after
        // an element.
        for n in span.first + 1..=span.last {
            if is_comment(n) {
                above.push_str(lines[n - 1].trim_start());
                above.push('\n');
            } else if let Some(c) = lines.get(n - 1).and_then(|l| inline_comment(l)) {
                above.push_str(c);
                above.push('\n');
            }
        }
        let inline = lines
            .get(span.first - 1)
            .and_then(|l| inline_comment(l))
            .map(|c| format!("  {c}"))
            .unwrap_or_default();
        let (section, body) = setting(&span.name, d, cfg, ctx);
        let mut block = above;
        for (i, line) in body.lines().enumerate() {
            block.push_str(line);
            // The inline comment goes after the setting's first line.
            if i == 0 && !line.starts_with('#') && !line.starts_with('[') {
                block.push_str(&inline);
            }
            block.push('\n');
        }
        // A setting that became a comment (or nothing) keeps its inline
        // comment on a line of its own.
        if (body.is_empty() || body.starts_with('#')) && !inline.is_empty() {
            block.push_str(inline.trim_start());
            block.push('\n');
        }
        blocks.push((section, block));
        prev_end = prev_end.max(span.last);
    }
    let trailing: String = (prev_end + 1..=lines.len())
        .filter(|&n| is_comment(n))
        .map(|n| format!("{}\n", lines[n - 1].trim_start()))
        .collect();

    let mut out = String::from(
        "# Migrantfile (TOML), converted by `migrant convert` from the original\n\
         # tool's bash-style file (kept as Migrantfile.orig by `--write`).\n",
    );
    for section in [Section::Top, Section::Share, Section::Network, Section::Ssh] {
        let parts: Vec<&String> = blocks
            .iter()
            .filter(|(s, _)| *s == section)
            .map(|(_, b)| b)
            .collect();
        if parts.is_empty() {
            continue;
        }
        out.push('\n');
        match section {
            Section::Network => out.push_str("[network]\n"),
            Section::Ssh => out.push_str("[ssh]\n"),
            _ => {}
        }
        for (i, p) in parts.iter().enumerate() {
            // Commented blocks stand apart, as they did in the original.
            if i > 0 && p.starts_with('#') {
                out.push('\n');
            }
            out.push_str(p);
        }
    }
    if !trailing.is_empty() {
        out.push('\n');
        out.push_str(&trailing);
    }
    out
}

/// A `# comment` after the value on an assignment's line (a `#` outside
/// quotes, at the start of a word).
fn inline_comment(line: &str) -> Option<&str> {
    let (mut single, mut double, mut escaped) = (false, false, false);
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' && !single {
            escaped = true;
        } else if c == '\'' && !double {
            single = !single;
        } else if c == '"' && !single {
            double = !double;
        } else if c == '#' && !single && !double && prev.is_whitespace() && i > 0 {
            return Some(line[i..].trim_end());
        }
        prev = c;
    }
    None
}

/// A TOML string.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A size the exact way a Migrantfile writes it (`4G`, `1500M`).
fn exact_size(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{}G", bytes / GIB)
    } else {
        format!("{}M", bytes / MIB)
    }
}

/// A path as the TOML file should say it: relative to the project when
/// inside it, `~/…` when in the user's home, else as it is.
fn path_text(value: &str, ctx: &Ctx) -> String {
    let p = Path::new(value);
    if let Ok(rel) = p.strip_prefix(&ctx.dir)
        && !rel.as_os_str().is_empty()
    {
        return rel.display().to_string();
    }
    if let Some(home) = &ctx.home
        && let Ok(rel) = p.strip_prefix(home)
        && !rel.as_os_str().is_empty()
    {
        return format!("~/{}", rel.display());
    }
    value.to_string()
}

/// The TOML for one variable of the original file: its section and lines
/// (empty when the variable needs no line of its own).
fn setting(name: &str, d: &Draft, cfg: &Config, ctx: &Ctx) -> (Section, String) {
    let top = |s: String| (Section::Top, s);
    let line = |key: &str, v: String| format!("{key} = {v}");
    match name {
        "VM_NAME" => top(d
            .name
            .as_ref()
            .map(|a| line("name", quoted(&a.value)))
            .unwrap_or_default()),
        "IMAGE_URL" => top(d
            .image
            .as_ref()
            .map(|a| line("image", quoted(&image_text(a, ctx))))
            .unwrap_or_default()),
        "IMAGE_CHECKSUM" => top(d
            .image_checksum
            .as_ref()
            .map(|a| line("image_checksum", quoted(&a.value)))
            .unwrap_or_default()),
        "RAM_MB" => top(d
            .memory
            .as_ref()
            .map(|a| line("memory", quoted(&exact_size(a.value))))
            .unwrap_or_default()),
        "DISK_GB" => top(d
            .disk
            .as_ref()
            .map(|a| line("disk", quoted(&exact_size(a.value))))
            .unwrap_or_default()),
        "VCPUS" => top(d
            .cpus
            .as_ref()
            .map(|a| line("cpus", a.value.to_string()))
            .unwrap_or_default()),
        "BOOT_FIRMWARE" => top(line(
            "firmware",
            quoted(match d.firmware {
                Firmware::Bios => "bios",
                Firmware::Uefi => "uefi",
            }),
        )),
        "AUTOCONNECT" => top(line(
            "autoconnect",
            quoted(match d.autoconnect {
                Autoconnect::None => "none",
                Autoconnect::Ssh => "ssh",
                Autoconnect::Console => "console",
            }),
        )),
        "TUNNEL_PORTS" => top(line(
            "tunnel_ports",
            format!(
                "[{}]",
                d.tunnel_ports
                    .iter()
                    .map(|a| a.value.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        "CLOUD_INIT_WAIT" => top(line("wait_cloud_init", d.wait_cloud_init.to_string())),
        "OS_VARIANT" => {
            top("# OS_VARIANT: not used by migrant (QEMU needs no guest OS hint)".to_string())
        }
        "SHARED_FOLDERS" => (Section::Share, shares(cfg, ctx)),
        // Folded into every share's `size` and `isolation`.
        "SHARED_FOLDER_SIZE_GB" | "SHARED_FOLDER_ISOLATION" => (
            Section::Share,
            if d.shares.is_empty() {
                format!("# {name}: no shared folders, nothing to carry over")
            } else {
                String::new()
            },
        ),
        "NETWORKS" => (
            Section::Network,
            format!(
                "# NETWORKS ({}): not carried over; migrant gives every VM its own network",
                d.legacy_networks.join(", ")
            ),
        ),
        "NETWORK_ISOLATION" => (
            Section::Network,
            line(
                "egress",
                quoted(match d.egress {
                    Egress::Open => "open",
                    Egress::None => "none",
                    Egress::Direct => "direct",
                }),
            ),
        ),
        "NETWORK_IPV6" => (
            Section::Network,
            line("ipv6", d.ipv6.as_ref().is_some_and(|a| a.value).to_string()),
        ),
        "HOST_ACCESS" => (
            Section::Network,
            if d.rules.is_empty() {
                line("rules", "[]".into())
            } else {
                let items: Vec<String> = d
                    .rules
                    .iter()
                    .map(|a| format!("  {},", quoted(&a.value)))
                    .collect();
                format!("rules = [\n{}\n]", items.join("\n"))
            },
        ),
        "SSH_KEY_PATH" => (
            Section::Ssh,
            d.ssh_key
                .as_ref()
                .map(|a| line("key", quoted(&key_text(a, ctx))))
                .unwrap_or_default(),
        ),
        _ => top(String::new()),
    }
}

/// The image as TOML says it: a local path relative to the project or
/// `~/…`, anything else (URL, name) as written.
fn image_text(at: &At<String>, ctx: &Ctx) -> String {
    if let Some(path) = at.value.strip_prefix("file://") {
        return format!("file://{}", path_text(path, ctx));
    }
    if at.value.contains("://") {
        return at.value.clone();
    }
    path_text(&at.value, ctx)
}

fn key_text(at: &At<String>, ctx: &Ctx) -> String {
    if at.value.starts_with("~/") {
        return at.value.clone();
    }
    path_text(&at.value, ctx)
}

/// `[[share]]` tables for `SHARED_FOLDERS`, with the size and isolation
/// each share has (the original's `SHARED_FOLDER_SIZE_GB` and
/// `SHARED_FOLDER_ISOLATION` folded in).
fn shares(cfg: &Config, ctx: &Ctx) -> String {
    let mut out = Vec::new();
    for s in &cfg.shares {
        let host = path_text(&s.host.display().to_string(), ctx);
        let mut t = vec!["[[share]]".to_string()];
        t.push(format!("host = {}", quoted(&host)));
        t.push(format!("tag = {}", quoted(&s.tag)));
        if let Some(guest) = &s.guest {
            t.push(format!("guest = {}", quoted(guest)));
        }
        if s.isolation {
            t.push(format!("size = {}", quoted(&exact_size(s.size))));
        }
        t.push(format!("isolation = {}", s.isolation));
        out.push(t.join("\n"));
    }
    out.join("\n\n")
}
