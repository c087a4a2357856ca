use clap::Parser;
use migrant::cli::{Cli, Cmd};
use std::process::ExitCode;

use migrant::logging::init as init_logging;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                migrant::exit::USAGE
            } else {
                0
            });
        }
    };
    // Hidden self-exec modes first, before any runtime exists.
    match cli.command {
        Cmd::Supervisor {
            name,
            project,
            lock_fd,
            progress_fd,
            config_fd,
            secrets_fd,
            boot_timeout,
        } => {
            init_logging(cli.verbose, "info");
            return ExitCode::from(migrant::supervisor::main(migrant::supervisor::Args {
                name,
                project,
                lock_fd,
                progress_fd,
                config_fd,
                secrets_fd,
                boot_timeout,
            }));
        }
        Cmd::WgLoop {
            tun_fd,
            udp_fd,
            report_fd,
            uid,
            gid,
            parent,
        } => {
            init_logging(cli.verbose, "info");
            return ExitCode::from(migrant::wireguard::child::main(
                migrant::wireguard::child::Args {
                    tun_fd,
                    udp_fd,
                    report_fd,
                    uid,
                    gid,
                    parent,
                },
            ));
        }
        Cmd::Virtiofsd {
            fd,
            shared_dir,
            tag,
            owner,
            guest_owner,
            cap,
        } => {
            init_logging(cli.verbose, "info");
            return ExitCode::from(migrant::share::virtiofsd::main(
                migrant::share::virtiofsd::Args {
                    fd,
                    shared_dir,
                    tag,
                    owner,
                    guest_owner,
                    cap,
                },
            ));
        }
        Cmd::Dataplane { vm: _ } => {
            init_logging(cli.verbose, "info");
            return ExitCode::from(migrant::net::dataplane::child::main());
        }
        Cmd::Netlab { netns, project } => {
            init_logging(cli.verbose, "warn");
            return match migrant::supervisor::netlab::netlab(&netns, &project) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("migrant: error: {}", migrant::exit::chain(e.as_ref()));
                    ExitCode::from(migrant::exit::SOFTWARE)
                }
            };
        }
        Cmd::Proxy { socket } => {
            return match migrant::provision::ssh::proxy(&socket) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("migrant: {}: {e}", socket.display());
                    ExitCode::from(migrant::exit::UNAVAILABLE)
                }
            };
        }
        _ => {}
    }
    init_logging(cli.verbose, "warn");
    match migrant::commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("migrant: error: {}", migrant::exit::chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}
