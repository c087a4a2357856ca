//! `migrant completions SHELL` and `migrant man`.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use super::Result;
use crate::cli::Cli;
use crate::error::Error;

pub fn completions(shell: clap_complete::Shell) -> Result<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "migrant", &mut out);
    write_stdout(&out)
}

pub fn man(dir: Option<&Path>) -> Result<u8> {
    let cmd = Cli::command();
    match dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(Error::io("cannot render the manual page"))?;
            write_stdout(&out)
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
            clap_mangen::generate_to(cmd, dir).map_err(Error::io(format!(
                "cannot write manual pages into {}",
                dir.display()
            )))?;
            println!("manual pages written to {}", dir.display());
            Ok(0)
        }
    }
}

pub(super) fn write_stdout(bytes: &[u8]) -> Result<u8> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(0),
        // `migrant man | head`: a closed pipe is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(Error::io("cannot write to standard output")(e)),
    }
}
