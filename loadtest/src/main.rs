//! The `switchyard-loadtest` binary: parse and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = switchyard_loadtest::cli::Cli::parse();
    match switchyard_loadtest::cli::main_with(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
