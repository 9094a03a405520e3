//! Compiles the `ecommerce.v1` contract. protoc comes from `protoc-bin-vendored`, so a fresh
//! machine with only Rust can build; the descriptor set feeds server reflection.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/ecommerce/v1/balance.proto",
    "proto/ecommerce/v1/product.proto",
    "proto/ecommerce/v1/coupon.proto",
    "proto/ecommerce/v1/order.proto",
    "proto/ecommerce/v1/payment.proto",
    "proto/ecommerce/v1/admin.proto",
    "proto/ecommerce/v1/cart.proto",
    "proto/ecommerce/v1/events.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A system protoc would be picked up by PROTOC; the vendored one keeps builds reproducible.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ecommerce_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
