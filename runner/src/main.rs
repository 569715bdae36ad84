//! `runner`: see the README. The subcommands live in `runner::cli` (the spot for `runner gpu`
//! is marked in its `Command` enum).

fn main() {
    std::process::exit(runner::cli::main_with(
        ops::Registry::builtin(),
        std::env::args_os(),
    ));
}
