//! The `highrise` command line.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "highrise", version, about = "A transformer inference engine that shows its residual and key/value streams")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the compute backends highrise can find, and whether each can run on this machine.
    ///
    /// Backends are shared libraries (libhighrise_<name>.so) looked for in $HIGHRISE_BACKEND_DIR, beside
    /// the executable, then in the cargo target directory.
    Backends {
        /// Print one JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Backends { json } => backends(json),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn backends(json: bool) -> highrise::Result<()> {
    use highrise::core::plugin::{discover, Plugin};
    for (name, path) in discover() {
        let (usable, detail) = match &path {
            None => (false, format!("not built: {}", highrise::core::plugin::backend_file_name(&name))),
            Some(p) => match Plugin::open(p).and_then(|pl| {
                pl.probe()?;
                pl.create()
            }) {
                Ok(b) => (true, b.info().device),
                Err(e) => (false, e.to_string()),
            },
        };
        let where_ = path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        if json {
            println!(
                "{{\"name\":{name:?},\"usable\":{usable},\"detail\":{detail:?},\"path\":{where_:?}}}"
            );
        } else {
            let mark = if usable { "usable" } else { "unusable" };
            println!("{name:<6} {mark:<9} {detail}");
            if !where_.is_empty() {
                println!("{:<16} {where_}", "");
            }
        }
    }
    Ok(())
}
