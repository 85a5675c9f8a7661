fn main() -> std::process::ExitCode {
    lbctl::cli::main()
}
