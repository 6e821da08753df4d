//! Switchyard's wire contracts.
//!
//! - [`v1`]: the public, versioned client API (`switchyard.v1`). Backwards-compatible changes
//!   only: new fields get new numbers, nothing is renumbered or reused.
//! - [`cluster::v1`]: the internal coordinator <-> worker protocol (`switchyard.cluster.v1`),
//!   one bidirectional stream per worker carrying step plans and step results.
//! - [`resume`]: a client's `Generate` stream that resumes across a lost coordinator.

pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

pub mod cluster {
    pub mod v1 {
        tonic::include_proto!("switchyard.cluster.v1");
    }
}

pub mod resume;

/// The encoded `FileDescriptorSet` of every contract above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));
