//! Code generated from `proto/ecommerce/v1` by build.rs.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    tonic::include_proto!("ecommerce.v1");
}

pub use generated::*;

/// The encoded descriptors of the contract (with google/protobuf imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ecommerce_descriptor");
