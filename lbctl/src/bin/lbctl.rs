//! The `lbctl` binary: the command line of [`lbctl::cli`].
fn main() -> std::process::ExitCode {
    lbctl::cli::main()
}
