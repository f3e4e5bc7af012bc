//! `p2pbridge`: the command-line face of the library.
//!
//! ```text
//! p2pbridge probe [--json]   what this host can do for NIC <-> accelerator transfers, and why not
//! ```
//! `probe` exits 0 when at least one registration strategy works here, 1 when none does, 2 on
//! bad arguments.

use p2pbridge::probe::Report;

const USAGE: &str = "usage: p2pbridge probe [--json]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("probe") => {
            let json = match &args[1..] {
                [] => false,
                [flag] if flag == "--json" => true,
                _ => {
                    eprintln!("{USAGE}");
                    std::process::exit(2)
                }
            };
            let report = Report::gather();
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("p2pbridge: cannot encode the report: {e}");
                        std::process::exit(1)
                    }
                }
            } else {
                print!("{}", report.to_text());
            }
            std::process::exit(if report.ok { 0 } else { 1 });
        }
        Some("-h") | Some("--help") => println!("{USAGE}"),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2)
        }
    }
}
