//! `ecommerce-loadgen`: load-tests a deployment and checks its invariants. All logic lives in
//! [`ecommerce::loadgen`] so integration tests drive the same code.

fn main() -> std::process::ExitCode {
    ecommerce::loadgen::cli::main()
}
