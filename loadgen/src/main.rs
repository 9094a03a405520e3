//! `ecommerce-loadgen`: load-tests a deployment and checks its invariants. All logic lives in
//! the library ([`ecommerce_loadgen`]) so the server's integration tests drive the same code.

// The same allocator as the server: the load generator shares the machine and should not be
// the bottleneck of the figures it reports.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ecommerce_loadgen::cli::main()
}
