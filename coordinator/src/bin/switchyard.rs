//! The `switchyard` binary: parse, set up logs and traces, then hand over to the library.

use clap::Parser;
use switchyard_coordinator::telemetry::LogFormat;

fn main() -> std::process::ExitCode {
    let cli = switchyard_coordinator::cli::Cli::parse();
    let format = cli.log_format;
    let telemetry =
        match switchyard_coordinator::telemetry::init(cli.otlp_endpoint.as_deref(), format) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: telemetry: {e:#}");
                return std::process::ExitCode::from(2);
            }
        };
    let code = match switchyard_coordinator::cli::main_with(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match format {
                // Log shippers read every line as JSON, the last one too.
                LogFormat::Json => tracing::error!(error = format!("{e:#}"), "exiting"),
                LogFormat::Text => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::from(2)
        }
    };
    drop(telemetry);
    code
}
