//! The `switchyard` binary: parse, set up logs and traces, then hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = switchyard_coordinator::cli::Cli::parse();
    let telemetry = match switchyard_coordinator::telemetry::init(cli.otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: telemetry: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let code = match switchyard_coordinator::cli::main_with(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    };
    drop(telemetry);
    code
}
